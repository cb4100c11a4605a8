"""The bundle: what training writes and serving reads. Encoder and heads load separately.

    bundle/
      polytask.json              format version, tasks, encoder fingerprint, pooling, max_length,
                                 compression recipe (replayed at load by variants.py)
      encoder/                   save_pretrained(): config.json, model.safetensors, tokenizer files
      heads/<task>/head.safetensors
      heads/<task>/head.json     the task spec, hidden size, and the encoder fingerprint it expects
                                 (a generation head: also its decoder's config and special ids)

Only safetensors and JSON are written or read: nothing here unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from polytask.durable import prepare_dir, swap_dir
from polytask.model.manifest import MANIFEST, BundleError, Manifest, read_manifest
from polytask.model.network import encoder_fingerprint
from polytask.tasks import TaskSpec, build_head

__all__ = ["MANIFEST", "BundleError", "Manifest", "load_bundle", "read_manifest", "save_bundle"]

def save_bundle(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    max_length: int,
    source: str = "",
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write a MultiTaskModel as a bundle beside `path` and swap it in by rename when complete
    (durable.swap_dir): a crash at any point leaves the previous bundle at `path`, or aside and
    restored by the next save."""
    path = Path(path)
    tmp = prepare_dir(path)
    model.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "encoder")
    fingerprint = encoder_fingerprint(model.encoder)
    hidden = model.encoder.config.hidden_size
    for name, spec in model.specs.items():
        head_dir = tmp / "heads" / name
        head_dir.mkdir(parents=True)
        head = model.heads[name]
        write_head_weights(head, head_dir)
        meta = {"spec": spec.to_dict(), "hidden_size": hidden, "encoder_fingerprint": fingerprint}
        if hasattr(head, "decoder_config"):
            meta["decoder"] = head.decoder_config()
        (head_dir / "head.json").write_text(json.dumps(meta, indent=2))
    manifest = Manifest(
        tasks=list(model.specs.values()),
        fingerprint=fingerprint,
        pooling=model.pooling,
        max_length=max_length,
        source=source,
        extra=extra or {},
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    swap_dir(tmp, path)
    return manifest


def write_head_weights(head: nn.Module, head_dir: Path) -> None:
    """head.safetensors; tied weights (a decoder's LM head and embeddings) are stored once."""
    save_model(head, str(head_dir / "head.safetensors"))


def load_encoder_part(
    path: str | Path, device: str = "cpu", trust_remote_code: bool = False
) -> tuple[nn.Module, Any, str]:
    """(encoder in eval mode, tokenizer, fingerprint computed from the loaded weights).

    A compressed encoder (int8, pruned) is rebuilt from the recipe in polytask.json."""
    from polytask.model.network import load_encoder

    enc_dir = Path(path) / "encoder"
    if not enc_dir.is_dir():
        raise BundleError(f"{path}: no encoder/ directory; is this a polytask bundle?")
    recipe = read_manifest(path).recipe if (Path(path) / MANIFEST).is_file() else []
    if recipe:
        from polytask.model.variants import load_compressed_encoder

        try:
            return load_compressed_encoder(enc_dir, recipe, device, trust_remote_code)
        except ValueError as exc:
            raise BundleError(f"{path}: {exc}") from None
    encoder, tokenizer = load_encoder(str(enc_dir), trust_remote_code=trust_remote_code)
    fingerprint = encoder_fingerprint(encoder)
    return encoder.to(device).eval(), tokenizer, fingerprint


def load_head(
    path: str | Path, task: str, encoder_fingerprint: str | None, device: str = "cpu"
) -> tuple[nn.Module, TaskSpec]:
    """One head, refused when it was trained against a different encoder than the one loaded."""
    head_dir = Path(path) / "heads" / task
    if not (head_dir / "head.json").is_file():
        known = sorted(p.name for p in (Path(path) / "heads").glob("*")) if Path(path).is_dir() else []
        raise BundleError(f"{path}: no head for task '{task}'; heads present: {known}")
    meta = json.loads((head_dir / "head.json").read_text())
    if encoder_fingerprint is not None and meta["encoder_fingerprint"] != encoder_fingerprint:
        raise BundleError(
            f"head '{task}' was trained against encoder {meta['encoder_fingerprint']} but the "
            f"loaded encoder is {encoder_fingerprint}; serve heads from the same bundle as the encoder"
        )
    spec = TaskSpec.from_dict(meta["spec"])
    if "decoder" in meta:
        from transformers import AutoTokenizer

        from polytask.model.generation import rebuild_generation_head

        tokenizer = AutoTokenizer.from_pretrained(Path(path) / "encoder", use_fast=True)
        head = rebuild_generation_head(meta["decoder"], tokenizer)
        if "int8" in meta["decoder"]:
            return _int8_decoder_head(head, meta["decoder"]["int8"], head_dir, task, device), spec
    else:
        head = build_head(spec, int(meta["hidden_size"]))
    load_model(head, str(head_dir / "head.safetensors"), device=device)
    return head.to(device).eval(), spec


def _int8_decoder_head(head: nn.Module, step: dict[str, Any], head_dir: Path, task: str, device: str) -> nn.Module:
    """A generation head whose decoder `polytask compress --decoder-int8` quantized: the fp32
    skeleton's named nn.Linear layers re-quantized, their int8 weights and scales loaded."""
    from safetensors.torch import load_file

    from polytask.model.int8 import rebuild_int8

    if device != "cpu":
        raise BundleError(
            f"head '{task}' has an int8 decoder, which runs on CPU only; serve it with device: cpu "
            "or serve the fp32 version"
        )
    state = {k.removeprefix("decoder."): v for k, v in load_file(head_dir / "head.safetensors").items()}
    try:
        head.decoder = rebuild_int8(head.decoder, step, state)
    except ValueError as exc:
        raise BundleError(f"head '{task}': {exc}") from None
    return head.eval()


def load_bundle(path: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    """The whole MultiTaskModel (eval mode), its tokenizer and manifest, for in-process prediction."""
    from polytask.model.network import MultiTaskModel

    manifest = read_manifest(path)
    encoder, tokenizer, fingerprint = load_encoder_part(path, device, trust_remote_code)
    if fingerprint != manifest.fingerprint:
        raise BundleError(
            f"{path}: encoder weights have fingerprint {fingerprint} but {MANIFEST} says "
            f"{manifest.fingerprint}; the bundle was modified or is incomplete"
        )
    heads = {spec.name: load_head(path, spec.name, fingerprint, device)[0] for spec in manifest.tasks}
    model = MultiTaskModel(encoder, manifest.tasks, manifest.pooling, heads=heads)
    return model.to(device).eval(), tokenizer, manifest
