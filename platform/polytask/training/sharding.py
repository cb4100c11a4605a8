"""FSDP (`scaling.parallel_strategy: fsdp`) for encoders too big for one device.

Under FSDP no rank holds the whole model, so whatever needs all of it — checkpoints, the
servable bundle, the loss weights that get logged — is gathered here with collectives that
every rank must call. Each transformer layer (the encoder's `_no_split_modules`, the Hugging
Face convention) and each task head becomes its own FSDP unit, so a forward pass holds one
layer unsharded at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def wrap(model: nn.Module, device: torch.device) -> FSDP:
    """FSDP with one unit per encoder layer and per task head; original parameters kept
    (use_orig_params) so the optimizer's encoder/head learning rates still see them.

    A head is its own unit so that a step of another task leaves its gradients None, not zero:
    as under DDP, AdamW then skips it instead of moving it on momentum and weight decay.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    names = set(getattr(model.encoder, "_no_split_modules", None) or ())
    layers = tuple({type(m) for m in model.encoder.modules() if type(m).__name__ in names})
    heads = {id(h) for h in model.heads.values()}
    return FSDP(
        model,
        auto_wrap_policy=CustomPolicy(lambda m: isinstance(m, layers) or id(m) in heads),
        device_id=device,
        use_orig_params=True,
    )


def _options(model: FSDP, **kwargs: Any) -> Any:
    """Full (unsharded) state dicts, moved to the CPU when the model is on an accelerator."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=True, cpu_offload=model.compute_device.type != "cpu", **kwargs
    )


def gather_state(
    model: FSDP, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole model's state dict and the optimizer's (keyed by parameter name); from GPUs only
    rank 0 gets them (others get empty dicts). Collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(model))


def load_state(
    model: FSDP,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Inverse of gather_state; every rank passes the full states and keeps its own shard.

    The model loads strictly (every key, no extras). AdamW has no state for a parameter no step
    has touched yet (an idle head, an unused pooler), so the optimizer state may lack exactly
    those: each one must still hold its initial value in the checkpoint, which proves it was
    never stepped rather than lost. Collective.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    fresh = get_model_state_dict(model, options=_options(model))  # this set-up's initial values
    check_unstepped(fresh, model_state, set(optimizer_state["state"]), trainable_names(model))
    set_model_state_dict(model, model_state, options=_options(model))
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=_options(model, strict=False)
    )


def trainable_names(model: FSDP) -> set[str]:
    """Names of the parameters the optimizer trains, as state dicts spell them (no FSDP prefix)."""
    prefix = "_fsdp_wrapped_module."
    return {n.replace(prefix, "") for n, p in model.named_parameters() if p.requires_grad}


def check_unstepped(
    fresh: dict[str, torch.Tensor],
    saved: dict[str, torch.Tensor],
    with_state: set[str],
    trainable: set[str],
) -> None:
    """Raise unless the parameters without optimizer state are ones no step has moved: their
    saved value equals the initial one (`fresh`; empty on ranks that get no full state)."""
    unknown = sorted(with_state - trainable)
    if unknown:
        raise RuntimeError(f"checkpoint has optimizer state for unknown parameters: {unknown}")
    moved = [
        name
        for name in sorted(trainable - with_state)
        if name in fresh and not torch.equal(fresh[name].cpu(), saved[name].cpu())
    ]
    if moved:
        raise RuntimeError(
            f"checkpoint has no optimizer state for trained parameters {moved}: its optimizer "
            "state is incomplete; resume from an earlier checkpoint"
        )


def loss_weights(model: FSDP) -> dict[str, float]:
    """The loss weighting's current λ per task (its parameters may sit on another rank). Collective."""
    with FSDP.summon_full_params(model, writeback=False):
        return model.module.weighting.weights()


def clip_grad_norm(model: FSDP, max_norm: float) -> None:
    """Clip by the norm over all shards (torch.nn.utils would see only this rank's)."""
    model.clip_grad_norm_(max_norm)
