"""The training loop without any framework: optimizer, schedule, `fit` (epochs, evaluation,
per-epoch callback), checkpoints.

`fit` is the one epoch loop: Ray Train workers (`polytask.training.ray_run`), the compression
tool's recovery fine-tune, the tests and the benchmarks all call it, so the plain-PyTorch baseline
and the Ray path execute the very same steps. `TrainState` is the plain data it works on; it is
not Ray's `TorchTrainer`, which only launches the workers that call `fit`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from polytask.config import ExperimentConfig, OptimConfig
from polytask.model.bundle import save_bundle
from polytask.model.decoding import check_position_limits
from polytask.model.generation import build_generation_head, generation_settings, resolve_decoder
from polytask.model.network import MultiTaskModel, build_model, encoder_fingerprint, load_encoder
from polytask.tasks import LOWER_IS_BETTER, NEW_PARAMETERS_LR, PERCENT_METRICS, TaskSpec
from polytask.training.base import base_bundle, load_base_parts
from polytask.training.batches import (
    JointBatches,
    StreamBatches,
    TaskBatches,
    TaskSampler,
    eval_batches,
)
from polytask.training.features import TaskFeatures, tokenize_split

STATE_DIR, BUNDLE_DIR = "state", "bundle"  # a checkpoint: training state + a servable bundle
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def make_optimizer(model: MultiTaskModel, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with separate encoder/head learning rates; no decay on biases and norms. A
    generation head's fresh decoder parameters (cross-attention, LM transform) get their own rate
    (`_fresh_decoder_parameters`): warm-started layers and fresh ones want different rates."""
    enc_lr = optim.encoder_lr or optim.lr
    head_lr = optim.head_lr or optim.lr
    fresh = _fresh_decoder_parameters(model, head_lr)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = enc_lr if name.startswith("encoder.") else fresh.get(name, head_lr)
        decay = 0.0 if any(k in name for k in _NO_DECAY) or name.startswith("weighting.") else optim.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]
    )


def _fresh_decoder_parameters(model: MultiTaskModel, head_lr: float) -> dict[str, float]:
    """{model parameter name: learning rate} for the generation heads' fresh decoder parameters:
    `new_lr_scale` × the head rate, or NEW_PARAMETERS_LR when it is unset."""
    out: dict[str, float] = {}
    for task, head in getattr(model, "heads", {}).items():
        spec = model.specs.get(task) if hasattr(model, "specs") else None
        if spec is None or spec.generation is None:
            continue
        scale = spec.generation.new_lr_scale
        lr = NEW_PARAMETERS_LR if scale is None else head_lr * scale
        for name in getattr(head, "new_parameters", ()):
            out[f"heads.{task}.decoder.{name}"] = lr
    return out


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate, then linear decay to zero."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    """Everything one worker's steps read and change; plain data, built by `setup`, advanced by
    `fit`, saved by `save_state`."""

    cfg: ExperimentConfig
    model: nn.Module  # possibly DDP/FSDP-wrapped
    core: MultiTaskModel  # the unwrapped model, for eval and saving
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: TaskSampler
    batches: TaskBatches | StreamBatches | JointBatches
    eval_features: dict[str, list[dict[str, Any]]]
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sharded: bool = False  # FSDP: no rank holds the whole model (see polytask.training.sharding)
    shadow: MultiTaskModel | None = None  # FSDP, rank 0: a plain copy to load gathered state into
    frozen: list[str] = field(default_factory=list)  # submodules not trained, kept in eval mode
    frozen_fingerprint: str | None = None  # encoder.freeze: the fingerprint every bundle must keep

    @property
    def specs(self) -> list[TaskSpec]:
        return list(self.core.specs.values())


def build_features(
    cfg: ExperimentConfig, task_data: dict[str, Any], tokenizer: Any
) -> tuple[TaskFeatures, TaskFeatures]:
    """Tokenized train and validation features per task (done once, on the driver)."""
    max_length = cfg.encoder.max_length
    return (
        tokenize_split(task_data, "train", tokenizer, max_length),
        tokenize_split(task_data, "validation", tokenizer, max_length),
    )


def setup(
    cfg: ExperimentConfig,
    specs: list[TaskSpec],
    train_features: dict[str, list[dict[str, Any]]],
    eval_features: dict[str, list[dict[str, Any]]],
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap: Any = None,
    train_shards: dict[str, Any] | None = None,
    train_rows: dict[str, int] | None = None,
) -> TrainState:
    """Build model, optimizer, schedule and data streams; `wrap` (e.g. prepare_model) adds DDP.

    A task's train data is in memory (`train_features`, sharded here) or streamed: a Ray Data
    shard iterator (`train_shards`) with the task's total row count (`train_rows`), from which
    the task schedule is computed exactly as for in-memory data."""
    torch.manual_seed(cfg.optim.seed)
    device = device or torch.device("cpu")
    base_path = base_bundle(cfg)
    base: dict[str, Any] = {"specs": [], "heads": {}, "fingerprint": None}
    if base_path is not None:
        base = load_base_parts(base_path, cfg.encoder.trust_remote_code)
        encoder, tokenizer = base["encoder"], base["tokenizer"]
    else:
        encoder, tokenizer = load_encoder(
            cfg.encoder.name_or_path, cfg.encoder.revision, cfg.encoder.trust_remote_code
        )
    specs, heads = generation_heads(specs, tokenizer, encoder, cfg.encoder.name_or_path)
    core = build_model(
        encoder,
        [*base["specs"], *specs],
        cfg.encoder.pooling,
        cfg.loss_weighting.method,
        {t.name: t.weight for t in cfg.tasks},
        cfg.loss_weighting.dwa_temperature,
        heads={**base["heads"], **heads},
    )
    frozen = _freeze(core, cfg.encoder.freeze, base["heads"])
    sharded = wrap is not None and cfg.scaling.parallel_strategy == "fsdp"
    shadow = copy.deepcopy(core) if sharded and rank == 0 else None
    model = wrap(core) if wrap else core.to(device)
    counts = {t: len(f) for t, f in train_features.items()} | (train_rows or {})
    rows = {s.name: counts[s.name] for s in specs if s.name in counts}  # the config's task order
    sizes = {name: max(1, math.ceil(n / world_size)) for name, n in rows.items()}
    sampler = TaskSampler(
        sizes,
        cfg.sampling.strategy,
        cfg.sampling.temperature,
        cfg.optim.seed,
        cfg.optim.epochs,
        cfg.sampling.steps_per_epoch,
        cfg.optim.batch_size,
    )
    optimizer = make_optimizer(core, cfg.optim)
    total = math.ceil(sampler.steps_per_epoch / cfg.optim.grad_accum_steps) * cfg.optim.epochs
    scheduler = make_scheduler(optimizer, total, cfg.optim.warmup_ratio)
    token_tasks = {s.name for s in specs if s.task_kind.sequence_labels}
    batches: TaskBatches | StreamBatches | JointBatches
    memory = TaskBatches(
        train_features,
        token_tasks,
        cfg.optim.batch_size,
        rank,
        world_size,
        cfg.optim.seed,
        tokenizer.pad_token_id,
    )
    batches = memory
    if train_shards:
        streamed = StreamBatches(
            train_shards, token_tasks, cfg.optim.batch_size, cfg.optim.seed, tokenizer.pad_token_id
        )
        batches = JointBatches(memory, streamed) if train_features else streamed
    dtype = _autocast_dtype(cfg.scaling.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return TrainState(
        cfg, model, core, tokenizer, optimizer, scheduler, sampler, batches, eval_features,
        device, dtype, scaler, rank, world_size, sharded=sharded, shadow=shadow, frozen=frozen,
        frozen_fingerprint=base["fingerprint"] or (encoder_fingerprint(encoder) if cfg.encoder.freeze else None),
    )


def generation_heads(
    specs: list[TaskSpec], tokenizer: Any, encoder: nn.Module, checkpoint: str
) -> tuple[list[TaskSpec], dict[str, nn.Module]]:
    """The specs with each generation task's decoder choice resolved, and those tasks' heads
    (from the encoder-decoder `checkpoint`, or new; the same seed makes every rank's equal)."""
    resolved = [resolve_decoder(s, encoder) if s.is_generation else s for s in specs]
    heads = {
        s.name: build_generation_head(s, tokenizer, encoder, checkpoint)
        for s in resolved
        if s.is_generation
    }
    check_position_limits(resolved, heads)
    return resolved, heads


def _freeze(core: MultiTaskModel, encoder: bool, base_heads: dict[str, nn.Module]) -> list[str]:
    """Install the base model's heads and stop gradients to them (and to the encoder when
    `encoder`); returns the frozen submodules' names, kept in eval mode while training."""
    frozen = []
    for name, head in base_heads.items():
        core.heads[name] = head
        frozen.append(f"heads.{name}")
    if encoder:
        frozen.append("encoder")
    for name in frozen:
        module = core.get_submodule(name)
        module.requires_grad_(False)
        module.eval()
    return frozen


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or setting == "no":
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def train_epoch(
    tr: TrainState, on_step: Callable[[int, int, dict[str, float]], None] | None = None
) -> dict[str, float]:
    """One epoch of task-homogeneous steps in the sampler's order; returns mean loss per task.
    `on_step(step, steps_per_epoch, mean losses so far)` runs after each step (progress lines,
    the chaos tests' kill window)."""
    tr.model.train()
    for name in tr.frozen:  # frozen parts compute what serving computes: no dropout
        tr.core.get_submodule(name).eval()
    tr.batches.start_epoch(tr.sampler.epoch)
    torch.manual_seed(tr.cfg.optim.seed * 1_000_003 + tr.sampler.epoch * 1009 + tr.rank)  # dropout
    accum = tr.cfg.optim.grad_accum_steps
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    tr.optimizer.zero_grad(set_to_none=True)
    for i, task in enumerate(tr.sampler, start=1):
        batch = {k: v.to(tr.device) for k, v in tr.batches.next(task).items()}
        with _autocast(tr):
            _, loss, weighted = tr.model(task, batch)
        _backward(tr, weighted / accum)
        sums[task] = sums.get(task, 0.0) + float(loss.detach())
        counts[task] = counts.get(task, 0) + 1
        if i % accum == 0 or i == tr.sampler.steps_per_epoch:
            _optimizer_step(tr)
        if on_step is not None:
            on_step(i, tr.sampler.steps_per_epoch, {t: sums[t] / counts[t] for t in sums})
    means = {t: sums[t] / counts[t] for t in sums}
    tr.core.weighting.end_epoch(means)
    return means


EpochCallback = Callable[["TrainState", dict[str, Any]], None]
StepCallback = Callable[[int, int, int, dict[str, float]], None]  # (epoch, step, steps, losses)


def fit(
    tr: TrainState,
    *,
    epochs: int | None = None,
    evaluate_each_epoch: bool = True,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
) -> list[dict[str, Any]]:
    """Train from `tr.epoch` (0, or where `load_state` left it) until `epochs` (default
    cfg.optim.epochs); returns rank 0's per-epoch records (`tr.history`).

    Each epoch: train, average the losses over ranks (DDP/FSDP), step the sampler, evaluate
    (rank 0; every rank under FSDP, where evaluation is a collective), then `on_epoch(tr, record)`
    on every rank (checkpoint, report). A record holds `epoch`, `start_epoch` (> 0: resumed) and,
    on rank 0, `objective`, `<task>/<metric>`, `train_loss/<task>`, `loss_weight/<task>`,
    `epoch_time_s` and `samples_per_s`.
    """
    start = tr.epoch
    for _ in range(tr.epoch, tr.cfg.optim.epochs if epochs is None else epochs):
        record = _fit_epoch(tr, evaluate_each_epoch, on_step)
        record["start_epoch"] = start
        if on_epoch is not None:
            on_epoch(tr, record)
    return tr.history


def _fit_epoch(
    tr: TrainState, evaluate_each_epoch: bool, on_step: StepCallback | None
) -> dict[str, Any]:
    epoch = tr.epoch
    began = time.perf_counter()
    step_hook = (lambda step, steps, losses: on_step(epoch, step, steps, losses)) if on_step else None
    losses = _global_means(tr, train_epoch(tr, step_hook))
    seconds = time.perf_counter() - began
    tr.sampler.next_epoch()
    tr.epoch += 1
    record: dict[str, Any] = {"epoch": epoch}
    if tr.rank != 0 and not tr.sharded:
        return record
    if evaluate_each_epoch:
        metrics = evaluate(
            tr.model if tr.sharded else tr.core,
            tr.eval_features,
            tr.cfg.optim.eval_batch_size,
            tr.tokenizer.pad_token_id,
            tr.device,
        )
    weights = _loss_weights(tr)
    if tr.rank != 0:
        return record
    if evaluate_each_epoch:
        record["objective"] = objective(metrics, tr.specs)
        record.update(flat_metrics(metrics))
    record.update({f"train_loss/{t}": v for t, v in losses.items()})
    record.update({f"loss_weight/{t}": w for t, w in weights.items()})
    samples = tr.sampler.steps_per_epoch * tr.cfg.optim.batch_size * tr.world_size
    record.update({"epoch_time_s": seconds, "samples_per_s": samples / max(seconds, 1e-9)})
    tr.history.append(record)  # the same dict: fields added before the callback land in history
    return record


def _loss_weights(tr: TrainState) -> dict[str, float]:
    if tr.sharded:
        from polytask.training import sharding

        return sharding.loss_weights(tr.model)
    return tr.core.weighting.weights()


def _global_means(tr: TrainState, losses: dict[str, float]) -> dict[str, float]:
    """Average each task's epoch loss over ranks, so DWA and the logged losses are global.
    Every rank trains the same task sequence, so the key sets agree."""
    if tr.world_size == 1:
        return losses
    import torch.distributed as dist

    names = sorted(losses)
    values = torch.tensor([losses[t] for t in names], dtype=torch.float64, device=tr.device)
    dist.all_reduce(values)
    means = {t: float(v) / tr.world_size for t, v in zip(names, values.tolist())}
    tr.core.weighting.history.pop()  # replace this rank's local entry with the global one
    tr.core.weighting.end_epoch(means)
    return means


def _autocast(tr: TrainState) -> contextlib.AbstractContextManager:
    if tr.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(tr.device.type, dtype=tr.autocast_dtype)


def _backward(tr: TrainState, loss: torch.Tensor) -> None:
    (tr.scaler.scale(loss) if tr.scaler else loss).backward()


def _optimizer_step(tr: TrainState) -> None:
    if tr.scaler:
        tr.scaler.unscale_(tr.optimizer)
    if tr.cfg.optim.max_grad_norm and tr.sharded:
        from polytask.training import sharding

        sharding.clip_grad_norm(tr.model, tr.cfg.optim.max_grad_norm)
    elif tr.cfg.optim.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.cfg.optim.max_grad_norm)
    if tr.scaler:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    features: dict[str, list[dict[str, Any]]],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Each task's metrics (its kind's metric set) on its validation features."""
    model.eval()
    out = {}
    for task, feats in features.items():
        spec = model.specs[task]
        if spec.is_generation:
            out[task] = _evaluate_generation(model, task, feats, batch_size, pad_token_id, device)
            continue
        token = spec.task_kind.level == "token"
        logits: list[np.ndarray] = [None] * len(feats)  # type: ignore[list-item]
        targets: list[Any] = [None] * len(feats)
        for idx, batch in eval_batches(feats, batch_size, pad_token_id, token):
            batch = {k: v.to(device) for k, v in batch.items()}
            lg, _, _ = model(task, batch)
            lg = lg.float().cpu().numpy()
            for row, i in enumerate(idx):
                n = len(feats[i]["input_ids"])
                logits[i] = lg[row, :n] if token else lg[row]
                targets[i] = np.asarray(feats[i]["labels"])
        out[task] = spec.task_kind.metrics(logits, targets, spec)
    return out


def _evaluate_generation(
    model: MultiTaskModel,
    task: str,
    feats: list[dict[str, Any]],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str,
) -> dict[str, float]:
    """bleu/chrf/rouge_l/exact of the generated texts against the targets (both decoded by the
    tokenizer, so the two sides are normalised alike), with the task's decoding settings."""
    spec = model.specs[task]
    tokenizer = model.heads[task].tokenizer
    predictions: list[str] = [""] * len(feats)
    for idx, batch in eval_batches(feats, batch_size, pad_token_id, True):
        batch = {k: v.to(device) for k, v in batch.items()}
        ids, _, _ = model(task, batch, generate=generation_settings(spec))
        for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            predictions[i] = text
    references = tokenizer.batch_decode([f["labels"] for f in feats], skip_special_tokens=True)
    return spec.task_kind.metrics(predictions, references, spec)


def objective(metrics: dict[str, dict[str, float]], specs: list[TaskSpec], weights: dict[str, float] | None = None) -> float:
    """Aggregate: (weighted) mean of each task's primary metric; lower-is-better ones negated,
    0-100 ones (bleu, chrf, rouge_l, exact) scaled to 0-1 like the rest."""
    total, norm = 0.0, 0.0
    for spec in specs:
        if spec.name not in metrics:
            continue
        name = spec.metric or spec.task_kind.primary_metric
        value = metrics[spec.name][name] / (100.0 if name in PERCENT_METRICS else 1.0)
        w = (weights or {}).get(spec.name, 1.0)
        total += w * (-value if name in LOWER_IS_BETTER else value)
        norm += w
    return total / norm if norm else float("nan")


def flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{'ner': {'f1': .5}} → {'ner/f1': .5}, the names MLflow and Ray report."""
    return {f"{task}/{k}": v for task, m in metrics.items() for k, v in m.items()}


# --- training state: safetensors tensors + JSON scalars, never pickle --------------------------


Gathered = tuple[dict[str, torch.Tensor], dict[str, Any]]


def gather_state(tr: TrainState) -> Gathered:
    """(model state, optimizer state) of the whole model. Under FSDP this is a collective that
    every rank calls; rank 0's result is the one written."""
    if tr.sharded:
        from polytask.training import sharding

        return sharding.gather_state(tr.model, tr.optimizer)
    return tr.core.state_dict(), tr.optimizer.state_dict()


def plain_model(tr: TrainState, model_state: dict[str, torch.Tensor]) -> MultiTaskModel:
    """An unwrapped model holding `model_state` (rank 0), e.g. to write a bundle from."""
    if tr.shadow is None:
        return tr.core
    tr.shadow.load_state_dict(model_state)
    return tr.shadow


def save_state(tr: TrainState, path: str | Path, gathered: Gathered | None = None) -> None:
    """Model, optimizer, scheduler, sampler, loss weighting and epoch, for exact resumption."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_state, opt = gathered or gather_state(tr)
    save_file(_unshared(model_state), path / "model.safetensors")
    tensors, scalars = {}, {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors or {"_empty": torch.zeros(1)}, path / "optimizer.safetensors")
    meta = {
        "epoch": tr.epoch,
        "sampler": tr.sampler.state_dict(),
        "scheduler_last_epoch": tr.scheduler.last_epoch,
        "optimizer_scalars": scalars,
        "optimizer_param_groups": opt["param_groups"],
        "weighting_history": tr.core.weighting.history,
        "scaler": tr.scaler.state_dict() if tr.scaler else None,
        "history": tr.history,
    }
    (path / "train_state.json").write_text(json.dumps(meta))


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors can write: a tensor tied to an earlier one (a decoder's LM head
    and its embeddings) is cloned, as safetensors refuses two names for one storage."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def save_checkpoint(tr: TrainState, path: str | Path, extra: dict[str, Any] | None = None) -> bool:
    """path/state (see save_state) and path/bundle (servable, whole model) of this epoch. Every
    rank calls it (under FSDP gathering the model is a collective); rank 0 writes and gets True."""
    gathered = gather_state(tr) if tr.rank == 0 or tr.sharded else None
    if tr.rank != 0:
        return False
    path = Path(path)
    save_state(tr, path / STATE_DIR, gathered)
    manifest = save_bundle(
        plain_model(tr, gathered[0]),
        tr.tokenizer,
        path / BUNDLE_DIR,
        tr.cfg.encoder.max_length,
        source=tr.cfg.encoder.name_or_path,
        extra=extra,
    )
    if tr.frozen_fingerprint is not None and manifest.fingerprint != tr.frozen_fingerprint:
        raise RuntimeError(
            f"encoder.freeze: the encoder's fingerprint changed from {tr.frozen_fingerprint} to "
            f"{manifest.fingerprint}; frozen weights must not change (a bug, please report it)"
        )
    return True


def load_state(tr: TrainState, path: str | Path) -> None:
    """Inverse of save_state, applied to a freshly set-up TrainState."""
    path = Path(path)
    device = "cpu" if tr.sharded else str(tr.device)  # FSDP copies each rank's shard itself
    model_state = load_file(path / "model.safetensors", device=device)
    meta = json.loads((path / "train_state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors", device=device)
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        if key == "_empty":
            continue
        pid, name = key.rsplit(".", 1)  # pid: an index, or a parameter name under FSDP
        state.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = value
    opt = {"state": state, "param_groups": meta["optimizer_param_groups"]}
    if tr.sharded:
        from polytask.training import sharding

        sharding.load_state(tr.model, tr.optimizer, model_state, opt)
    else:
        tr.core.load_state_dict(model_state)
        tr.optimizer.load_state_dict(opt)
    tr.scheduler.last_epoch = meta["scheduler_last_epoch"]
    tr.scheduler._last_lr = [g["lr"] for g in tr.optimizer.param_groups]
    tr.sampler.load_state_dict(meta["sampler"])
    tr.core.weighting.history = meta["weighting_history"]
    if tr.scaler and meta["scaler"]:
        tr.scaler.load_state_dict(meta["scaler"])
    tr.epoch = meta["epoch"]
    tr.history = meta["history"]
