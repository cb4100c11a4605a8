"""Dynamic int8 quantization of an encoder's nn.Linear layers for CPU serving, saved without pickle.

torch.ao's `quantize_dynamic` packs weights into opaque ScriptObjects; we store their int8
values, per-channel scales and fp32 biases as plain tensors and re-pack them at load time.
On this CPU it beat torchao 0.18 in eager mode (MiniLM-L6, batch 32, 2 threads: fp32 305 seq/s,
torchao int8-dynamic 56, torchao int8-weight-only 224, torch.ao 456), hence torch.ao despite its
deprecation notice (which says "removed in 2.10"; 2.13 still ships it).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

SCHEME = "dynamic"  # int8 weights (per output channel), activations quantized per batch at run time


def default_engine() -> str:
    """onednn where this torch build has it (measured fastest here: 2.44x vs 1.95x for x86 on
    an AMX CPU at 1 thread, see jobs/bench/compress_bench.py), else torch's own default engine."""
    if "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return torch.backends.quantized.engine


def _usable(engine: str | None) -> str:
    """The recorded engine if this machine has it, else the local default: int8 values and
    scales are engine-independent, only their packing is not (and packing happens at load)."""
    return engine if engine in torch.backends.quantized.supported_engines else default_engine()


@contextlib.contextmanager
def _torch_ao(engine: str | None = None) -> Iterator[None]:
    """Run torch.ao calls on `engine`, without their deprecation notices (the API is still
    present and is what we measured fastest), and restore the process-wide engine afterwards."""
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per"
        )
        if engine:
            if engine not in torch.backends.quantized.supported_engines:
                raise ValueError(
                    f"int8 engine '{engine}' is not supported by this torch build; pick one of "
                    f"{torch.backends.quantized.supported_engines}"
                )
            torch.backends.quantized.engine = engine
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


def linear_names(encoder: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the nn.Linear modules to quantize; a name containing any `skip` part is left fp32."""
    return [
        name
        for name, module in encoder.named_modules()
        if type(module) is nn.Linear and not any(part in name for part in skip)
    ]


def quantize_encoder(
    encoder: nn.Module, skip: tuple[str, ...] = (), engine: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(int8 copy of `encoder` on CPU, the recipe step that rebuilds it)."""
    import copy

    names = linear_names(encoder, skip)
    if not names:
        raise ValueError("int8: the encoder has no nn.Linear layers left to quantize; check --skip")
    engine = engine or default_engine()
    quantized = _quantize_modules(copy.deepcopy(encoder).cpu().eval(), names, engine)
    step = {
        "method": "int8",
        "scheme": SCHEME,
        "weight": "qint8 per-channel affine (axis 0)",
        "activation": "quint8 per-tensor, dynamic (8-bit on oneDNN + VNNI, else 7-bit; at load)",
        "engine": engine,
        "modules": names,
    }
    return quantized, step


def full_range_activations(engine: str) -> bool:
    """Whether activations may use all 8 bits: torch.ao always takes 7 (reduce_range) so the int16
    sums of pre-VNNI instructions cannot saturate; oneDNN on a VNNI/AMX CPU sums in int32, and
    the 8th bit halves the activation rounding error (MiniLM WNUT-17 F1 drop: 1.19 → 0.69 points)."""
    return engine == "onednn" and torch.cpu._is_vnni_supported()


@functools.cache
def _int8_linear_class() -> type[nn.Module]:
    """torch.ao's dynamic int8 Linear whose activation range is chosen per module at build time."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class Int8Linear(DynamicLinear):
        full_range = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(
                x, self._packed_params._packed_params, reduce_range=not self.full_range
            )
            return y.to(x.dtype)

    return Int8Linear


def _quantize_modules(encoder: nn.Module, names: list[str], engine: str) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _torch_ao(engine):
        spec = {name: per_channel_dynamic_qconfig for name in names}
        mapping = {nn.Linear: _int8_linear_class()}
        quantized = quantize_dynamic(
            encoder, spec, dtype=torch.qint8, mapping=mapping, inplace=True
        )
    full = full_range_activations(engine)
    for module in _dynamic_linears(quantized).values():
        module.full_range = full
    return quantized


def _dynamic_linears(encoder: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {n: m for n, m in encoder.named_modules() if isinstance(m, DynamicLinear)}


def int8_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized encoder as plain safetensors-able tensors (no qint8 dtype)."""
    qlinears = _dynamic_linears(encoder)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in encoder.state_dict().items()
        if torch.is_tensor(v) and not any(k.startswith(n + ".") for n in qlinears)
    }
    with _torch_ao():
        for name, module in qlinears.items():
            weight, bias = module._weight_bias()
            if weight.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric):
                raise ValueError(
                    f"{name}: expected a per-channel int8 weight, got {weight.qscheme()}"
                )
            state[f"{name}.weight_int8"] = weight.int_repr().contiguous()
            state[f"{name}.weight_scale"] = weight.q_per_channel_scales().contiguous()
            state[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().contiguous()
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().contiguous()
    return state


def rebuild_int8(
    skeleton: nn.Module, step: dict[str, Any], state: dict[str, torch.Tensor]
) -> nn.Module:
    """Load the fp32 tensors into a skeleton, quantize the modules the recipe names, then set
    their int8 weights and scales from the state."""
    names = list(step["modules"])
    quantized = set(names)
    plain = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in quantized}
    missing, unexpected = skeleton.load_state_dict(plain, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized]
    if missing or unexpected:
        raise ValueError(
            f"int8 encoder state does not match its recipe: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; re-create the bundle with `polytask compress`"
        )
    engine = _usable(step.get("engine"))
    encoder = _quantize_modules(skeleton.cpu().eval(), names, engine)
    qlinears = _dynamic_linears(encoder)
    with _torch_ao(engine):
        for name in names:
            try:
                values = state[f"{name}.weight_int8"]
                scales, zero_points = (
                    state[f"{name}.weight_scale"],
                    state[f"{name}.weight_zero_point"],
                )
            except KeyError as exc:
                raise ValueError(
                    f"int8 encoder state has no {exc.args[0]}; the bundle is incomplete"
                ) from None
            weight = torch._make_per_channel_quantized_tensor(values, scales, zero_points, 0)
            qlinears[name].set_weight_bias(weight, state.get(f"{name}.bias"))
    return encoder.eval()
