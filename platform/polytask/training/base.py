"""Adding tasks to a trained polytask model: `encoder.name_or_path` naming a polytask model.

The encoder, tokenizer and existing heads come from the model's bundle; the existing heads are
carried over unchanged. Resolution lives here, in the training layer, because it needs the
registry (`tracking/`), which `config.py` must not import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytask.config import ExperimentConfig
from polytask.model.manifest import MANIFEST, Manifest, read_manifest
from polytask.tracking.registry import client, resolve_bundle, tracking_uri, use_tracking_uri
from polytask.tracking.uris import AliasNotFound, is_local_path, parse_model_uri, pin_model_uri


class BaseModelError(ValueError):
    """The base model cannot take the experiment's tasks (clash, compressed encoder, no freeze)."""


@dataclass
class BaseModel:
    """The trained model new tasks are added to, pinned to one version."""

    ref: str  # models:/NAME/VERSION, runs:/..., or an absolute bundle path
    path: Path
    manifest: Manifest
    name: str | None = None  # registered model name, when `ref` is a registered version
    version: int | None = None

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.manifest.tasks]


def is_polytask_model(name_or_path: str) -> bool:
    """A registry/run URI or a bundle directory, rather than a Hugging Face encoder."""
    if is_local_path(name_or_path):
        return (Path(name_or_path).expanduser() / MANIFEST).is_file()
    return parse_model_uri(name_or_path).kind in ("alias", "version", "run")


def resolve_base(cfg: ExperimentConfig) -> tuple[ExperimentConfig, BaseModel | None]:
    """(cfg with the base pinned to one version, its pooling/max_length and the tracking URI it
    was found in; the base), or (cfg, None) when the encoder is not a polytask model. Run once,
    on the driver."""
    if not is_polytask_model(cfg.encoder.name_or_path):
        return cfg, None
    uri = tracking_uri(cfg)
    try:
        ref = pin_model_uri(cfg.encoder.name_or_path, lambda: client(uri))
    except AliasNotFound as exc:
        raise BaseModelError(
            f"encoder.name_or_path: {exc}; pass models:/NAME/VERSION or set the alias with "
            "`polytask registry promote`"
        ) from exc
    base = _load(ref, uri)
    problems = _problems(cfg, base)
    if problems:
        raise BaseModelError("; ".join(problems))
    encoder = cfg.encoder.model_copy(
        update={
            "name_or_path": ref,
            "pooling": base.manifest.pooling,
            "max_length": base.manifest.max_length,
        }
    )
    # Workers resolve the base themselves (other nodes cannot read this one's cache), from the
    # store the driver used, whatever their own environment says.
    tracking = cfg.tracking.model_copy(update={"tracking_uri": uri})
    return cfg.model_copy(update={"encoder": encoder, "tracking": tracking}), base


def _load(ref: str, uri: str) -> BaseModel:
    with use_tracking_uri(uri):
        path = resolve_bundle(ref)
    parsed = parse_model_uri(ref)
    version = int(parsed.version) if parsed.kind == "version" else None
    return BaseModel(ref, path, read_manifest(path), parsed.name, version)


def _problems(cfg: ExperimentConfig, base: BaseModel) -> list[str]:
    problems = []
    if not cfg.encoder.freeze:
        problems.append(
            f"encoder.freeze: must be true when encoder.name_or_path is a polytask model "
            f"({base.ref}): its existing heads only fit the encoder unchanged; set "
            "--set encoder.freeze=true (polytask add-task does)"
        )
    if base.manifest.recipe:
        problems.append(
            f"encoder.name_or_path: {base.ref} is a compressed ({base.manifest.variant}) "
            "encoder; add tasks to the full-precision version it was made from"
        )
    for task in cfg.task_names:
        if task in base.task_names:
            problems.append(
                f"tasks.{task}: {base.ref} already has a task '{task}' (it has: "
                f"{', '.join(base.task_names)}); rename the new task, or retrain the model with "
                "`polytask train` to change an existing head"
            )
    return problems


def base_bundle(cfg: ExperimentConfig) -> Path | None:
    """The base bundle on this node (a worker downloads it into its own cache), or None."""
    if not is_polytask_model(cfg.encoder.name_or_path):
        return None
    with use_tracking_uri(tracking_uri(cfg)):
        return resolve_bundle(cfg.encoder.name_or_path)


def load_base_parts(path: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Encoder (eval mode), tokenizer, fingerprint and every head of the base bundle."""
    from polytask.model.bundle import load_encoder_part, load_head

    encoder, tokenizer, fingerprint = load_encoder_part(path, "cpu", trust_remote_code)
    manifest = read_manifest(path)
    if fingerprint != manifest.fingerprint:
        raise BaseModelError(
            f"{path}: encoder weights have fingerprint {fingerprint} but {MANIFEST} says "
            f"{manifest.fingerprint}; the bundle was modified or is incomplete"
        )
    heads = {s.name: load_head(path, s.name, fingerprint)[0] for s in manifest.tasks}
    return {
        "encoder": encoder,
        "tokenizer": tokenizer,
        "fingerprint": fingerprint,
        "specs": manifest.tasks,
        "heads": heads,
    }


def add_task_config(
    model: str, experiment: str | Path, overrides: list[str] | None = None
) -> ExperimentConfig:
    """`polytask add-task MODEL EXPERIMENT.yaml`: the experiment's tasks trained as new heads on
    MODEL's frozen encoder, registered as a new version of MODEL's registered model unless the
    experiment names another (`tracking.registered_model`)."""
    import json

    from polytask.config import load_config

    forced = [f"encoder.name_or_path={json.dumps(model)}", "encoder.freeze=true"]
    cfg = load_config(experiment, [*(overrides or []), *forced])
    if not is_polytask_model(model):
        raise BaseModelError(
            f"MODEL '{model}': not a polytask model; pass models:/NAME@ALIAS, models:/NAME/VERSION, "
            "runs:/RUN_ID/model or a bundle directory (`polytask registry list` shows them)"
        )
    parsed = parse_model_uri(model)
    if cfg.tracking.registered_model is None and parsed.registered:
        tracking = cfg.tracking.model_copy(update={"registered_model": parsed.name})
        cfg = cfg.model_copy(update={"tracking": tracking})
    return cfg
