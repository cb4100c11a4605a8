"""The pruned-encoder format: a BERT-layout encoder whose layers keep only some attention heads
and FFN neurons, sliced out of the weight matrices so the result is smaller *and* dense.

Loading a pruned bundle replays the recorded per-layer shapes on an fp32 skeleton
(`rebuild_pruned`); choosing what to cut is the compression tool's job (`compression/prune.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def transformer_layers(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's transformer layers, checked to have the BERT module layout we slice."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None or len(layers) == 0:
        raise ValueError(
            f"prune: {type(encoder).__name__} has no encoder.layer list; structured pruning "
            "supports BERT-layout encoders (BERT, MiniLM, RoBERTa, ELECTRA) — use --method int8"
        )
    for i, layer in enumerate(layers):
        for part in _PARTS:
            try:
                module = layer.get_submodule(part)
            except AttributeError:
                module = None
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"prune: layer {i} has no plain nn.Linear '{part}' (int8 or another layout); "
                    "prune the fp32 bundle of a BERT-layout encoder"
                )
    return list(layers)


def layer_params(encoder: nn.Module) -> int:
    """Parameter count the sparsity is measured over: all transformer layers."""
    return sum(p.numel() for layer in transformer_layers(encoder) for p in layer.parameters())


def head_size(encoder: nn.Module) -> int:
    cfg = encoder.config
    return cfg.hidden_size // cfg.num_attention_heads


def heads_in(layer: nn.Module, size: int) -> int:
    return layer.attention.self.query.out_features // size


def apply(encoder: nn.Module, keep: list[dict[str, list[int]]]) -> nn.Module:
    """Slice every layer down to its kept heads and neurons, in place; returns the encoder."""
    from transformers.pytorch_utils import prune_linear_layer

    size = head_size(encoder)
    layers = transformer_layers(encoder)
    if len(keep) != len(layers):
        raise ValueError(f"prune recipe has {len(keep)} layers but the encoder has {len(layers)}")
    for layer, k in zip(layers, keep):
        att = layer.attention
        idx = torch.tensor(
            [h * size + d for h in k["heads"] for d in range(size)], dtype=torch.long
        )
        for name in ("query", "key", "value"):
            setattr(att.self, name, prune_linear_layer(getattr(att.self, name), idx, dim=0))
        att.output.dense = prune_linear_layer(att.output.dense, idx, dim=1)
        att.self.num_attention_heads = len(k["heads"])
        att.self.all_head_size = len(k["heads"]) * size
        nidx = torch.tensor(k["neurons"], dtype=torch.long)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, nidx, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, nidx, dim=1)
    return encoder


def rebuild_pruned(skeleton: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Give an unpruned skeleton the recorded per-layer shapes (weights are loaded afterwards)."""
    keep = [
        {
            "heads": list(range(int(layer["heads"]))),
            "neurons": list(range(int(layer["intermediate"]))),
        }
        for layer in step["layers"]
    ]
    return apply(skeleton, keep)
