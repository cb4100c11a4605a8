"""Timing a bundle against its compressed copy on the same batches: encoder throughput and
generation end to end, interleaved so that a busy neighbour hits every model alike."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from polytask.model.bundle import Manifest
    from polytask.model.network import MultiTaskModel


def throughput_batches(
    features: dict[str, list[dict[str, Any]]], pad_id: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Every validation input of every task, length-sorted and padded per batch."""
    from polytask.training.batches import collate

    keys = ("input_ids", "attention_mask", "token_type_ids")
    feats = [{k: v for k, v in f.items() if k in keys} for fs in features.values() for f in fs]
    feats.sort(key=lambda f: len(f["input_ids"]))
    out = []
    for i in range(0, len(feats), batch_size):
        out.append(collate(feats[i : i + batch_size], pad_id))
    return out


@torch.inference_mode()
def encoder_throughput(
    encoders: dict[str, nn.Module], batches: list[dict[str, torch.Tensor]], repeats: int = 3
) -> dict[str, float]:
    """Sequences per second of each encoder over the same batches. Each batch is timed `repeats`
    times per encoder, interleaved across encoders, and its fastest time counts: a busy neighbour
    on a shared machine inflates some timings, rarely all of them, and hits every encoder alike."""
    n = sum(len(b["input_ids"]) for b in batches)
    keys = list(encoders)
    best = {k: [math.inf] * len(batches) for k in keys}
    for enc in encoders.values():
        enc(**batches[0])
    for r in range(repeats):
        for i, batch in enumerate(batches):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                start = time.perf_counter()
                encoders[key](**batch)
                best[key][i] = min(best[key][i], time.perf_counter() - start)
    return {k: n / sum(times) for k, times in best.items()}


GENERATION_TIMED = 64  # generation inputs timed end to end per bundle (decoding is the slow part)


def generation_batches(
    manifest: Manifest, features: dict[str, list[dict[str, Any]]], pad_id: int, batch_size: int
) -> list[tuple[str, dict[str, torch.Tensor], dict[str, Any]]]:
    """(task, batch, `generate` settings) over the first GENERATION_TIMED validation inputs of
    each generation task, length-sorted: what end-to-end generation timing runs."""
    from polytask.model.generation import generation_settings
    from polytask.training.batches import collate

    keys = ("input_ids", "attention_mask", "token_type_ids")
    out = []
    for spec in manifest.tasks:
        if not spec.is_generation or spec.name not in features:
            continue
        feats = [{k: v for k, v in f.items() if k in keys} for f in features[spec.name][:GENERATION_TIMED]]
        feats.sort(key=lambda f: len(f["input_ids"]))
        for i in range(0, len(feats), batch_size):
            out.append((spec.name, collate(feats[i : i + batch_size], pad_id), generation_settings(spec)))
    return out


@torch.inference_mode()
def generation_throughput(
    models: dict[str, MultiTaskModel],
    batches: list[tuple[str, dict[str, torch.Tensor], dict[str, Any]]],
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Per model: {"seq_per_s", "tokens_per_s"} of generation end to end (encoder + decoder,
    the task's own decoding settings) over the same batches, timed like `encoder_throughput`
    (interleaved, fastest of `repeats` per batch); tokens are the generated ones, EOS excluded."""
    keys = list(models)
    best = {k: [math.inf] * len(batches) for k in keys}
    tokens = {k: [0] * len(batches) for k in keys}
    for r in range(max(1, repeats)):
        for i, (task, batch, settings) in enumerate(batches):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                start = time.perf_counter()
                ids, _, _ = models[key](task, batch, generate=settings)
                best[key][i] = min(best[key][i], time.perf_counter() - start)
                tokens[key][i] = sum(len(row) for row in ids)
    n = sum(len(b["input_ids"]) for _, b, _ in batches)
    return {
        k: {"seq_per_s": n / sum(best[k]), "tokens_per_s": sum(tokens[k]) / sum(best[k])} for k in keys
    }
