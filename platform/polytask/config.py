"""The experiment file: a typed pydantic tree, `--set` overrides, and one readable error.

This module imports neither torch nor ray, so `polytask validate` answers in well under a second.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from polytask.errors import error_lines
from polytask.tasks import KINDS, NEW_PARAMETERS_LR, generates_text

KIND_NAMES = tuple(KINDS)


class ConfigError(ValueError):
    """Every problem in an experiment file, one per line, each starting with its key path."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EncoderConfig(_Section):
    name_or_path: str = Field(
        description="Hugging Face hub id or local directory of the encoder, or a polytask model "
        "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., a bundle directory) whose encoder, "
        "tokenizer and heads the new tasks are added to."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    max_length: int = Field(128, ge=8, le=8192, description="Longest tokenized input; longer is cut.")
    pooling: Literal["cls", "mean"] = Field("cls", description="How sentence tasks pool tokens.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint; off unless you trust it."
    )
    freeze: bool = Field(
        False,
        description="Train heads only: the encoder's weights (and so its fingerprint) stay as "
        "loaded, so the new heads can be served beside a running encoder.",
    )


class DataConfig(_Section):
    format: Literal["auto", "hub", "csv", "tsv", "jsonl", "json", "parquet", "conll"] = Field(
        "auto", description="auto: 'hub' when `hub` is set, else from the train file's extension."
    )
    hub: str | None = Field(None, description="datasets hub name; train/validation are split names.")
    hub_config: str | None = Field(None, description="datasets config name (e.g. 'sst2').")
    train: str = Field(description="Train file path (relative to the experiment file) or split.")
    validation: str | None = Field(None, description="Validation file path or split name.")
    test: str | None = Field(
        None,
        description="Test file path or split name: the best checkpoint is scored on it once, at "
        "the end of `polytask train` (MLflow `test/<task>/<metric>`).",
    )
    text_field: str = Field("text", description="Column with the input text.")
    text_pair_field: str | None = Field(
        None, description="Second text column: set it and any sentence-level task reads pairs."
    )
    label_field: str = Field("label", description="Column with the label (or label list).")
    target_field: str = Field(
        "target", description="Column with the target text (generation tasks)."
    )
    tokens_field: str = Field("tokens", description="Column with word lists (token tasks).")
    tags_field: str = Field("tags", description="Column with tag lists (token tasks).")
    label_separator: str = Field("|", description="Splits multilabel strings like 'a|b'.")
    max_samples: int | None = Field(None, ge=1, description="Keep only the first N train rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Keep the first N eval rows.")
    streaming: Literal["auto", True, False] = Field(
        "auto",
        description="Train split through Ray Data (read and tokenized on Ray's workers, streamed "
        "to each Train worker) instead of tokenized on the driver; auto: only a csv/tsv/jsonl/"
        "parquet train file over 64 MiB.",
    )


class HeadConfig(_Section):
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before the head.")
    hidden_dim: int | None = Field(None, ge=1, description="Add one hidden layer of this size.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Multilabel decision threshold.")
    decoder: Literal["checkpoint", "new"] | None = Field(
        None,
        description="Generation tasks: where the decoder comes from. checkpoint: the decoder and "
        "LM head of the encoder-decoder checkpoint in encoder.name_or_path (T5, BART, Marian, "
        "...; config.is_encoder_decoder), whose encoder is the shared encoder; new: a fresh "
        "transformer decoder (decoder_layers layers) with cross-attention over the shared "
        "encoder's token states, on the encoder tokenizer's vocabulary. Default: checkpoint for "
        "an encoder-decoder checkpoint, else new.",
    )
    decoder_layers: int = Field(
        2, ge=1, le=48, description="Generation tasks, decoder: new: its number of layers."
    )
    decoder_init: Literal["encoder", "random"] | None = Field(
        None,
        description="Generation tasks, decoder: new: encoder warm-starts it from the encoder "
        "(embeddings and decoder_layers of its layers copied; cross-attention and the LM "
        "transform fresh; BERT2BERT), random starts it fresh. Default: encoder for a BERT-layout "
        "encoder (BERT, MiniLM), else random.",
    )
    decoder_layers_from: Literal["bottom", "top"] = Field(
        "bottom",
        description="Generation tasks, decoder_init: encoder: copy the encoder's first (bottom) "
        "or last (top) decoder_layers layers.",
    )
    new_lr_scale: float | None = Field(
        None,
        gt=0.0,
        le=1000.0,
        description="Generation tasks, decoder: new: multiplies the head learning rate for the "
        f"decoder parameters that start fresh (cross-attention, LM transform); unset: they learn "
        f"at {NEW_PARAMETERS_LR:g}, the rate the copy-task learning curves chose.",
    )
    tie_embeddings: bool = Field(
        True,
        description="Generation tasks, decoder: new: start its token embeddings (and the tied "
        "LM head) as a copy of the encoder's.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Generation tasks: label smoothing of the token loss."
    )


class GenerationConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest generated text, in tokens.")
    num_beams: int = Field(1, ge=1, le=32, description="Beam search width; 1: greedy.")
    length_penalty: float = Field(
        1.0, description="Beam search: >1 favours longer texts, <1 shorter ones."
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="Never repeat an n-gram of this size; 0: off."
    )


class TaskConfig(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$", description="Task id: lowercase, _ ok.")
    kind: str = Field(description="One of: " + ", ".join(KIND_NAMES) + ".")
    data: DataConfig = Field(description="Where the examples come from.")
    labels: list[str] | None = Field(None, description="Label set; inferred from train if unset.")
    weight: float = Field(1.0, gt=0.0, description="Static loss weight λ for this task.")
    head: HeadConfig = Field(default_factory=HeadConfig, description="Head options.")
    metric: str | None = Field(None, description="Primary metric; the kind's default if unset.")
    generation: GenerationConfig | None = Field(
        None, description="Generation tasks: how text is decoded (evaluation, predict, serve)."
    )

    @property
    def is_generation(self) -> bool:
        return generates_text(self.kind)

    @property
    def pair(self) -> bool:
        """A pair task: a sentence-level or generation kind whose data names a second text."""
        return KINDS[self.kind].level != "token" and self.data.text_pair_field is not None

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in KIND_NAMES:
            raise ValueError(f"'{value}' is not a task kind; choose one of {', '.join(KIND_NAMES)}")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @model_validator(mode="after")
    def _check_metric(self) -> TaskConfig:
        if self.kind not in KIND_NAMES:
            return self
        names = KINDS[self.kind].metric_names
        if self.metric is None:
            self.metric = KINDS[self.kind].primary_metric
        elif self.metric not in names:
            raise ValueError(
                f"metric '{self.metric}' is not reported by kind '{self.kind}'; "
                f"choose one of {', '.join(names)}"
            )
        ignored = {("data", k): why for k, why in ignored_data_fields(self.kind, self.data).items()}
        ignored.update(ignored_task_fields(self))
        if ignored:
            raise ValidationError.from_exception_data(
                "TaskConfig",
                [
                    InitErrorDetails(
                        type=PydanticCustomError(error_type, why),
                        loc=loc,
                        input=_value_at(self, loc),
                    )
                    for loc, (error_type, why) in ignored.items()
                ],
            )
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels contains duplicates; list each label once")
        return self


_TOKEN_ONLY = ("tokens_field", "tags_field")
_SENTENCE_ONLY = ("text_field", "text_pair_field", "label_field", "label_separator")
_LABELS_ONLY = ("label_field", "label_separator")
_DECODER_ONLY = (
    "decoder",
    "decoder_layers",
    "decoder_init",
    "decoder_layers_from",
    "new_lr_scale",
    "tie_embeddings",
    "label_smoothing",
)


def _written(section: BaseModel) -> set[str]:
    """Keys set in the file and not at their default: a dumped-and-reloaded config sets every
    field, so only a changed value counts as written."""
    fields = type(section).model_fields
    return {k for k in section.model_fields_set if getattr(section, k) != fields[k].default}


def _value_at(task: TaskConfig, loc: tuple[str, ...]) -> Any:
    node: Any = task
    for key in loc:
        node = getattr(node, key)
    return node.model_dump() if isinstance(node, BaseModel) else node


def ignored_task_fields(task: TaskConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    """Task and head keys (path → (error type, why)) that the task's kind never reads."""
    out: dict[tuple[str, ...], tuple[str, str]] = {}
    head = _written(task.head)
    if task.is_generation:
        why = (
            "generation tasks write text (data.target_field) and have no label set or decision "
            "threshold, so this is never read; remove it"
        )
        if task.labels is not None:
            out[("labels",)] = ("ignored_field", why)
        out.update({("head", k): ("ignored_field", why) for k in ("threshold", "hidden_dim") if k in head})
        return out
    why = f"only generation tasks have a decoder; {task.kind} never reads this; remove it"
    out.update({("head", k): ("ignored_field", why) for k in _DECODER_ONLY if k in head})
    if task.generation is not None:
        out[("generation",)] = ("ignored_field", f"only generation tasks generate text; {why.split('; ', 1)[1]}")
    return out


def ignored_data_fields(kind: str, data: DataConfig) -> dict[str, tuple[str, str]]:
    """data.<key> → (error type, why) for each key set in the file that this kind would never
    read (a setting that does nothing is a mistake), and for a pair_classification without pair."""
    written = _written(data)
    out = {}
    if not generates_text(kind) and "target_field" in written:
        why = f"only generation tasks read a target text; {kind} reads data.label_field; remove it"
        out["target_field"] = ("ignored_field", why)
    if generates_text(kind):
        why = (
            "generation tasks read data.text_field (plus data.text_pair_field) and "
            "data.target_field, so this is never read; remove it"
        )
        out.update({key: ("ignored_field", why) for key in _TOKEN_ONLY + _LABELS_ONLY if key in written})
    elif KINDS[kind].level == "token":
        why = (
            f"{kind} tasks read words and tags (data.tokens_field, data.tags_field or a CoNLL "
            "file) and take no second text, so this is never read; remove it"
        )
        out.update({key: ("ignored_field", why) for key in _SENTENCE_ONLY if key in written})
    else:
        why = (
            f"{kind} tasks read data.text_field (plus data.text_pair_field for pairs) and "
            "data.label_field, so this is never read; remove it, or use kind token_classification"
        )
        out.update({key: ("ignored_field", why) for key in _TOKEN_ONLY if key in written})
        if "label_separator" in written and kind != "multilabel":
            why = f"only multilabel tasks split labels; {kind} reads each label whole; remove it"
            out["label_separator"] = ("ignored_field", why)
    if KINDS[kind].pair_only and not data.text_pair_field:
        why = (
            f"is required by {kind} (the column holding the second text); kind classification "
            "also reads pairs when text_pair_field is set"
        )
        out["text_pair_field"] = ("value_error", why)
    return out


class SamplingConfig(_Section):
    strategy: Literal["proportional", "temperature", "uniform", "annealed"] = Field(
        "temperature", description="How the next batch's task is drawn (p ∝ n, n^(1/T), 1, T→1)."
    )
    temperature: float = Field(2.0, ge=1.0, description="T for temperature/annealed sampling.")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Batches per epoch per worker; default: all train batches once."
    )


class LossWeightingConfig(_Section):
    method: Literal["static", "uncertainty", "dwa"] = Field(
        "static", description="static: task weights; uncertainty: Kendall 2018; dwa: Liu 2019."
    )
    dwa_temperature: float = Field(2.0, gt=0.0, description="Softmax temperature for DWA.")


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0.0, description="Learning rate (both parts unless split below).")
    encoder_lr: float | None = Field(None, gt=0.0, description="Encoder learning rate override.")
    head_lr: float | None = Field(None, gt=0.0, description="Head learning rate override.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps warming up.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay.")
    epochs: int = Field(3, ge=1, description="Passes over the training schedule.")
    batch_size: int = Field(32, ge=1, description="Examples per batch per worker.")
    eval_batch_size: int = Field(64, ge=1, description="Examples per evaluation batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping; null: off.")
    seed: int = Field(42, description="Seed for init, shuffling and task sampling.")


class ScalingConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources per worker, e.g. {CPU: 2}."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, off on CPU."
    )
    parallel_strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp replicates the model; fsdp shards it for encoders too big for one."
    )


class RunConfig(_Section):
    name: str | None = Field(None, description="Run name; relaunching the same name resumes it.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (dir or s3://); default .polytask/ray_results."
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Best N checkpoints kept by objective.")
    max_failures: int = Field(1, ge=-1, description="Worker group restarts allowed (-1: no limit).")
    progress_every_s: float = Field(
        10.0,
        ge=0.0,
        description="`polytask train` prints a progress line this often (and at the end of each "
        "epoch); 0: after every step.",
    )


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow URI; default $MLFLOW_TRACKING_URI or .polytask/mlflow.db."
    )
    experiment: str = Field("polytask", description="MLflow experiment name.")
    system_metrics: bool | None = Field(
        None,
        description="Log MLflow system metrics (CPU, memory, disk, network, GPU) of the driver's "
        "machine to the run while it trains; null: as $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says.",
    )
    registered_model: str | None = Field(None, description="Model Registry name; null: skip.")
    promote: Literal["if_better", "always", "never"] = Field(
        "if_better", description="When a new version also gets the `champion` alias."
    )


class TuneConfig(_Section):
    search_space: dict[str, str] = Field(
        default_factory=dict,
        description="key path → 'loguniform(a, b)' | 'uniform(a, b)' | 'choice([..])' | ...",
    )
    weights: Literal["independent", "simplex"] = Field(
        "independent", description="simplex: task weights sum to the number of tasks."
    )
    num_samples: int = Field(4, ge=1, description="Trials to run.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once.")
    search_alg: Literal["random", "grid", "optuna"] = Field("random", description="Searcher.")
    scheduler: Literal["asha", "none"] = Field("asha", description="Early stopping scheduler.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA reduction factor.")
    name: str | None = Field(None, description="Sweep name; relaunching the same name resumes.")


class ExperimentConfig(_Section):
    encoder: EncoderConfig = Field(description="The shared pretrained encoder.")
    tasks: list[TaskConfig] = Field(min_length=1, description="The task heads trained jointly.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Task mixing.")
    loss_weighting: LossWeightingConfig = Field(
        default_factory=LossWeightingConfig, description="How task losses are combined."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimization.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train scale.")
    run: RunConfig = Field(default_factory=RunConfig, description="Checkpoints and restarts.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    tune: TuneConfig | None = Field(None, description="Ray Tune sweep (polytask tune).")
    base_dir: str = Field(".", description="Relative data paths resolve here (the file's dir).")

    @model_validator(mode="after")
    def _unique_task_names(self) -> ExperimentConfig:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        return self

    def task(self, name: str) -> TaskConfig:
        """The task named `name`, or an error listing the known ones."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task '{name}'; known tasks: {', '.join(self.task_names)}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def resolve_path(self, path: str) -> Path:
        """A data path as written, made absolute against the experiment file's directory."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.base_dir) / p


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """`a.b=c` strings → (path, YAML-parsed value) pairs; values parse as YAML so 1e-4 is a float."""
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError([f"--set {item}: expected KEY=VALUE, e.g. optim.lr=3e-5"], "--set")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return pairs


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted; list items by index or, for tasks, by task name) inside raw YAML data."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, ".".join(parts[:i]))
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError([f"{key}: '{'.'.join(parts[:i])}' is not a section"], "--set")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _list_index(items: list[Any], part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for idx, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return idx
    names = [str(it.get("name")) for it in items if isinstance(it, dict)]
    raise ConfigError([f"{where}.{part}: no such item; use an index or one of {names}"], "--set")


def load_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None
) -> ExperimentConfig:
    """Read an experiment YAML, apply `--set` overrides, validate, and return the typed config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found; pass the path of an experiment YAML"], "file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"], str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"], str(path))
    data.setdefault("base_dir", str(path.resolve().parent))
    return config_from_dict(data, overrides, source=str(path))


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> ExperimentConfig:
    """Validate raw data (e.g. parsed YAML) into an ExperimentConfig, or raise one ConfigError."""
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        apply_override(data, key, value)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(error_lines(exc.errors(), ExperimentConfig), source) from None


def default_home() -> Path:
    """Project-local state dir (MLflow db, Ray results); POLYTASK_HOME overrides."""
    return Path(os.environ.get("POLYTASK_HOME", ".polytask")).resolve()
