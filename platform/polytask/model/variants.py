"""Loading compressed encoders (int8, pruned, chains of both) from a bundle's recipe.

polytask.json's `encoder.recipe` lists the steps `polytask compress` applied; loading replays
them on an fp32 skeleton before reading the weights, so it never unpickles and never guesses
shapes. Serving needs only this module; making compressed bundles lives in `compression/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from polytask.model.int8 import int8_state, rebuild_int8
from polytask.model.network import encoder_fingerprint, encoder_from_config, tensors_fingerprint
from polytask.model.pruning import rebuild_pruned

METHODS = ("int8", "prune")
WEIGHTS = "model.safetensors"


def load_compressed_encoder(
    enc_dir: str | Path,
    recipe: list[dict[str, Any]],
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, str]:
    """config → fp32 skeleton → replay the recipe's shape/quantization steps → load the weights.

    Returns what `bundle.load_encoder_part` returns: (encoder in eval mode, tokenizer, fingerprint).
    """
    from transformers import AutoConfig, AutoTokenizer

    enc_dir = Path(enc_dir)
    methods = [step.get("method") for step in recipe]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown compression step(s) {unknown} in the recipe")
    if "int8" in methods and device != "cpu":
        raise ValueError(
            f"{enc_dir.parent} is an int8 bundle, which runs on CPU only; serve the fp32 "
            "version on GPU (device: cpu for this one)"
        )
    config = AutoConfig.from_pretrained(enc_dir, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        enc_dir, use_fast=True, trust_remote_code=trust_remote_code
    )
    encoder = encoder_from_config(config, trust_remote_code)
    state = load_file(enc_dir / WEIGHTS)
    for step in recipe:
        if step["method"] == "prune":
            rebuild_pruned(encoder, step)
    if "int8" in methods:
        encoder = rebuild_int8(encoder, recipe[methods.index("int8")], state)
        fingerprint = tensors_fingerprint(int8_state(encoder))
    else:
        try:
            encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"{enc_dir}: weights do not match the recipe's shapes: {exc}"
            ) from None
        fingerprint = encoder_fingerprint(encoder)
    return encoder.to(device).eval(), tokenizer, fingerprint
