"""Encoder pass planning: `plan_passes` cuts a length-sorted batch at the cheapest points, and a
planned batch encodes to the same states as one padded pass."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from polytask.model.inference import encode_batch, pass_overhead_tokens, plan_passes
from polytask.model.network import load_encoder


def _cost(lengths: list[int], passes: list[list[int]], overhead: float) -> float:
    return sum(overhead + len(p) * max(lengths[i] for i in p) for p in passes)


def _best_cost(lengths: list[int], max_inputs: int, overhead: float) -> float:
    """Brute force over every way to cut the sorted order into consecutive passes."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = math.inf
    for mask in itertools.product((False, True), repeat=len(order) - 1):
        cuts = [0, *(i + 1 for i, cut in enumerate(mask) if cut), len(order)]
        passes = [order[a:b] for a, b in itertools.pairwise(cuts)]
        if all(len(p) <= max_inputs for p in passes):
            best = min(best, _cost(lengths, passes, overhead))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_the_cheapest_cut_and_covers_every_input_once(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(3, 120, size=int(rng.integers(1, 10)))]
    max_inputs = int(rng.integers(1, 6))
    overhead = float(rng.uniform(0, 80))
    passes = plan_passes(lengths, max_inputs, overhead)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert all(1 <= len(p) <= max_inputs for p in passes)
    flat = [lengths[i] for p in passes for i in p]
    assert flat == sorted(flat)  # consecutive runs of the length-sorted order
    assert _cost(lengths, passes, overhead) == pytest.approx(
        _best_cost(lengths, max_inputs, overhead)
    )


def test_short_and_long_inputs_go_in_separate_passes_unless_a_pass_costs_more() -> None:
    lengths = [100, 10, 10, 100, 10, 10]
    short, long_ = [1, 2, 4, 5], [0, 3]
    assert [sorted(p) for p in plan_passes(lengths, 32, 30.0)] == [short, long_]
    assert [sorted(p) for p in plan_passes(lengths, 32, 1000.0)] == [list(range(6))]


def test_no_overhead_or_an_infinite_one_cuts_plainly_at_max_inputs() -> None:
    lengths = [5, 1, 4, 2, 3]
    assert plan_passes(lengths, 2, None) == [[1, 3], [4, 2], [0]]
    assert plan_passes(lengths, 2, math.inf) == [[1, 3], [4, 2], [0]]
    assert plan_passes([], 4, 10.0) == []


def test_planned_passes_encode_like_one_padded_pass(tiny_encoder: Path) -> None:
    encoder, tokenizer = load_encoder(str(tiny_encoder))
    encoder.eval()
    texts = ["hi", "a much longer sentence about the weather in the north", "ok then", "x " * 40]
    common = {"max_length": 64, "pooling": "mean", "need_pooled": True, "need_tokens": True}
    one = encode_batch(encoder, tokenizer, texts, None, **common)
    sizes: list[int] = []
    planned = encode_batch(
        encoder, tokenizer, texts, None, overhead_tokens=0.0, pass_sizes=sizes, **common
    )
    assert len(sizes) > 1 and sum(sizes) == len(texts)
    for a, b, text in zip(one, planned, texts):
        np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-5)
        np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5)
        assert a.word_ids == b.word_ids and a.word_spans == b.word_spans
        assert len(b.tokens) == len(tokenizer(text, truncation=True, max_length=64)["input_ids"])


def test_measured_overhead_is_a_finite_token_count(tiny_encoder: Path) -> None:
    encoder, _ = load_encoder(str(tiny_encoder))
    overhead = pass_overhead_tokens(encoder.eval(), max_length=64)
    assert 0 <= overhead <= 1e6
