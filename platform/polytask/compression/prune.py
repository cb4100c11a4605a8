"""Structured pruning: score attention heads and FFN neurons, pick the least important ones
across layers, and cut them with the pruned-encoder format of `model/pruning.py`.

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

from polytask.model.pruning import apply, head_size, heads_in, layer_params, transformer_layers

MIN_FFN_KEEP = 0.05  # each layer keeps at least this share of its FFN neurons (and one head)


def magnitude_scores(encoder: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head scores, neuron scores) per layer from weights alone: a head's value rows times its
    output-projection columns; a neuron's input row times its output column (L2 norms)."""
    size = head_size(encoder)
    heads, neurons = [], []
    for layer in transformer_layers(encoder):
        n = heads_in(layer, size)
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
    heads = [torch.zeros(heads_in(layer, size)) for layer in layers]
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
