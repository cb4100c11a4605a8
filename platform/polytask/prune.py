"""Structured pruning of a BERT-layout encoder: whole attention heads and FFN neurons are cut out
of the weight matrices, so the pruned model is smaller *and* dense (faster on any hardware).

Sparsity counts parameters of the transformer layers (`encoder.layer.*`, LayerNorms included);
embeddings are excluded, since they cost a lookup, not FLOPs. The per-layer shapes go into the
recipe, so loading rebuilds the same slices before reading the weights — no shape guessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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
MIN_FFN_KEEP = 0.05  # each layer keeps at least this share of its FFN neurons (and one head)


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


def _heads(layer: nn.Module, size: int) -> int:
    return layer.attention.self.query.out_features // size


def magnitude_scores(encoder: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head scores, neuron scores) per layer from weights alone: a head's value rows times its
    output-projection columns; a neuron's input row times its output column (L2 norms)."""
    size = head_size(encoder)
    heads, neurons = [], []
    for layer in transformer_layers(encoder):
        n = _heads(layer, size)
        value = layer.attention.self.value.weight.detach().reshape(n, size, -1)
        out = layer.attention.output.dense.weight.detach().reshape(-1, n, size)
        heads.append(value.flatten(1).norm(dim=1) * out.transpose(0, 1).flatten(1).norm(dim=1))
        w_in = layer.intermediate.dense.weight.detach()
        w_out = layer.output.dense.weight.detach()
        neurons.append(w_in.norm(dim=1) * w_out.norm(dim=0))
    return heads, neurons


def taylor_scores(
    encoder: nn.Module, losses: Iterable[Callable[[], torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head scores, neuron scores) as |dL/d mask| summed over batches (Michel et al., 2019):
    for a unit feeding a linear layer W, that is |Σ W ⊙ ∂L/∂W| over the unit's input columns."""
    size = head_size(encoder)
    layers = transformer_layers(encoder)
    heads = [torch.zeros(_heads(layer, size)) for layer in layers]
    neurons = [torch.zeros(layer.output.dense.in_features) for layer in layers]
    batches = 0
    for loss_fn in losses:
        encoder.zero_grad(set_to_none=True)
        loss_fn().backward()
        batches += 1
        for i, layer in enumerate(layers):
            o = layer.attention.output.dense.weight
            heads[i] += (o * o.grad).detach().cpu().sum(0).reshape(-1, size).sum(1).abs()
            w = layer.output.dense.weight
            neurons[i] += (w * w.grad).detach().cpu().sum(0).abs()
    encoder.zero_grad(set_to_none=True)
    if batches == 0:
        raise ValueError("prune: no batches to score importance on; check the experiment's data")
    return heads, neurons


def plan(
    encoder: nn.Module,
    sparsity: float,
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
) -> list[dict[str, list[int]]]:
    """Which heads and neurons each layer keeps, to remove `sparsity` of the layer parameters.

    Heads and neurons are each ranked across layers by per-layer-normalized score; heads take
    their share first, FFN neurons then make up the exact parameter budget.
    """
    if not 0.0 < sparsity < 0.95:
        raise ValueError(f"--sparsity {sparsity}: must be in (0, 0.95)")
    layers = transformer_layers(encoder)
    size, hidden = head_size(encoder), encoder.config.hidden_size
    head_cost = 4 * hidden * size + 3 * size  # q, k, v rows (+ bias) and output-projection columns
    neuron_cost = 2 * hidden + 1  # intermediate row (+ bias) and output column
    budget = sparsity * layer_params(encoder)
    n_heads = sum(len(s) for s in head_scores)
    n_neurons = sum(len(s) for s in neuron_scores)
    share = min(1.0, budget / (n_heads * head_cost + n_neurons * neuron_cost))
    drop_heads = _lowest(head_scores, round(share * n_heads), [1] * len(layers))
    removed = sum(len(d) for d in drop_heads) * head_cost
    min_keep = [max(1, math.ceil(MIN_FFN_KEEP * len(s))) for s in neuron_scores]
    drop_neurons = _lowest(neuron_scores, round(max(0.0, budget - removed) / neuron_cost), min_keep)
    return [
        {
            "heads": [h for h in range(len(hs)) if h not in set(dh)],
            "neurons": [j for j in range(len(ns)) if j not in set(dn)],
        }
        for hs, ns, dh, dn in zip(head_scores, neuron_scores, drop_heads, drop_neurons)
    ]


def _lowest(scores: list[torch.Tensor], count: int, keep_min: list[int]) -> list[list[int]]:
    """Indices of the `count` lowest units across layers (scores normalized per layer by their
    L2 norm), never leaving a layer with fewer than keep_min of its units."""
    ranked = sorted(
        (float(s[j] / s.norm().clamp(min=1e-12)), layer, j)
        for layer, s in enumerate(scores)
        for j in range(len(s))
    )
    left = [len(s) for s in scores]
    dropped: list[list[int]] = [[] for _ in scores]
    for _, layer, j in ranked:
        if count <= 0:
            break
        if left[layer] > keep_min[layer]:
            dropped[layer].append(j)
            left[layer] -= 1
            count -= 1
    return dropped


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


def prune_encoder(
    encoder: nn.Module,
    sparsity: float,
    losses: Iterable[Callable[[], torch.Tensor]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """(the encoder pruned in place, the recipe step that records its shapes); importance is
    gradient-based when `losses` is given, else weight magnitude."""
    before = layer_params(encoder)
    scores = taylor_scores(encoder, losses) if losses is not None else magnitude_scores(encoder)
    keep = plan(encoder, sparsity, *scores)
    apply(encoder, keep)
    after = layer_params(encoder)
    step = {
        "method": "prune",
        "sparsity": sparsity,
        "importance": "taylor" if losses is not None else "magnitude",
        "measured_over": "encoder.layer.* parameters",
        "params_before": before,
        "params_after": after,
        "layers": [
            {"heads": len(k["heads"]), "intermediate": len(k["neurons"]), "kept_heads": k["heads"]}
            for k in keep
        ],
    }
    return encoder, step


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
