"""Continuous batching (model/decoding.py) against the static path (`generation.generate`): tiny
random decoders of each kind built here (a `new` BERT decoder, T5, BART), no Ray."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from polytask.model.decoding import Row, StepBatch, decode_rows, position_limit
from polytask.model.generation import CHECKPOINT, NEW, GenerationHead, _without_encoder, generate

HIDDEN, VOCAB, EOS, START, PAD = 32, 120, 3, 2, 0


def _new_head() -> GenerationHead:
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
        pad_token_id=PAD, bos_token_id=START, eos_token_id=EOS, initializer_range=0.05,
    )
    decoder = BertLMHeadModel(config)
    return GenerationHead(decoder.eval(), NEW, None, {"start": START, "eos": EOS, "pad": PAD})


def _t5_head() -> GenerationHead:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, initializer_factor=2.0,
    )
    model = T5ForConditionalGeneration(config)
    return GenerationHead(_without_encoder(model).eval(), CHECKPOINT, None, {"start": PAD, "eos": EOS, "pad": PAD})


def _bart_head(**generation: Any) -> GenerationHead:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=START,
        eos_token_id=EOS, decoder_start_token_id=EOS, forced_eos_token_id=EOS, tie_word_embeddings=False, init_std=0.05,
    )
    model = BartForConditionalGeneration(config)
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    return GenerationHead(_without_encoder(model).eval(), CHECKPOINT, None, {"start": EOS, "eos": EOS, "pad": PAD})


HEADS = {"new": _new_head, "t5": _t5_head, "bart": _bart_head}


def _inputs(n: int, seed: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """n encoder outputs of mixed lengths and mixed caps."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3 + (7 * i) % 11 for i in range(n)]
    states = [10 * torch.randn(k, HIDDEN, generator=gen) for k in lengths]  # answers depend on them
    caps = [4 + (5 * i) % 17 for i in range(n)]
    return states, caps


def _with_eos_mid_answer(head: GenerationHead, states: list[torch.Tensor], caps: list[int]) -> None:
    """Make the token the head most often produces mid-answer its EOS, so rows end on EOS at
    different steps (random tiny decoders rarely pick their real EOS)."""
    free = _static(head, states, caps)
    where: dict[int, set[int]] = {}
    for ids in free:
        for token in set(ids):
            where.setdefault(token, set()).add(ids.index(token))
    head.eos_id = max(where, key=lambda t: (min(where[t]) >= 2, len(where[t])))


def _static(head: GenerationHead, states: list[torch.Tensor], caps: list[int], **kw: Any) -> list[list[int]]:
    width = max(s.shape[0] for s in states)
    padded = torch.zeros(len(states), width, HIDDEN)
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for i, s in enumerate(states):
        padded[i, : s.shape[0]], mask[i, : s.shape[0]] = s, 1
    return generate(head, padded, mask, max_new_tokens=caps, **kw)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_greedy_equals_the_static_path_token_for_token_while_rows_join_and_leave(kind: str) -> None:
    torch.manual_seed(0)
    head = HEADS[kind]()
    states, caps = _inputs(9)
    _with_eos_mid_answer(head, states, caps)
    want = _static(head, states, caps)
    lengths = {len(ids) for ids in want}
    assert len(lengths) > 2, want  # rows end at different steps (EOS or their caps)
    assert any(len(ids) < cap for ids, cap in zip(want, caps)), "no row ended on EOS"
    rows = [Row(s, cap) for s, cap in zip(states, caps)]
    assert decode_rows(head, rows, max_rows=3) == want  # 3 at a time: the rest join mid-decode
    rows = [Row(s, cap) for s, cap in zip(states, caps)]
    assert decode_rows(head, rows, max_rows=64) == want


def test_minimum_and_ngram_blocking_match_the_static_path() -> None:
    torch.manual_seed(1)
    head = _new_head()
    states, caps = _inputs(5, seed=3)
    want = _static(head, states, caps, min_new_tokens=[min(3, c) for c in caps], no_repeat_ngram_size=2)
    rows = [Row(s, c, least=min(3, c), no_repeat_ngram_size=2) for s, c in zip(states, caps)]
    assert decode_rows(head, rows, max_rows=2) == want


def test_a_checkpoints_forced_bos_and_bad_words_are_honoured() -> None:
    torch.manual_seed(2)
    plain = _bart_head()
    states, caps = _inputs(4, seed=5)
    free = decode_rows(plain, [Row(s, c) for s, c in zip(states, caps)])
    banned = free[0][1]
    head = _bart_head(forced_bos_token_id=7, bad_words_ids=[[banned]])
    head.load_state_dict(plain.state_dict())
    got = decode_rows(head, [Row(s, c) for s, c in zip(states, caps)])
    assert all(ids[0] == 7 for ids in got)
    assert all(banned not in ids[1:] for ids in got)
    assert got == _static(head, states, caps)  # the static path reads the same generation config


def test_sampling_is_reproducible_per_seed_and_rows_leave_when_cancelled() -> None:
    torch.manual_seed(3)
    head = _new_head()
    states, _ = _inputs(3)
    draw = [decode_rows(head, [Row(s, 12, least=12, temperature=1.0, top_p=0.9, seed=5) for s in states])]
    draw.append(decode_rows(head, [Row(s, 12, least=12, temperature=1.0, top_p=0.9, seed=5) for s in states]))
    assert draw[0] == draw[1]
    assert decode_rows(head, [Row(states[0], 12, least=12, temperature=1.0, seed=6)]) != draw[0][:1]

    batch = StepBatch(head)
    rows = [Row(s, 40, least=40) for s in states]
    batch.admit(rows)
    batch.step()
    rows[1].cancelled = True
    events = batch.step()
    assert (rows[1], None, "cancelled") in events and len(batch) == 2
    assert rows[1].produced == 2  # it decoded no further


def test_position_limits_by_decoder_kind() -> None:
    assert position_limit(_new_head().decoder) == 63
    assert position_limit(_bart_head().decoder) == 63
    assert position_limit(_t5_head().decoder) is None  # relative positions


def test_the_step_loop_hands_tokens_to_asyncio_and_stops_cancelled_rows() -> None:
    import asyncio

    from polytask.serve.decode_loop import DecodeLoop, Waiter

    head = _new_head()
    states, caps = _inputs(6)
    want = _static(head, states, caps)
    loop_thread = DecodeLoop(max_rows=2, threads=1)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        waiters = [Waiter(loop, stream=True) for _ in states]
        rows = [Row(s, c, on_token=w.on_token, on_done=w.on_done) for s, c, w in zip(states, caps, waiters)]
        gone = Waiter(loop, False)

        def hang_up(_: int) -> None:  # the caller leaves after its third token (decode thread)
            if long.produced >= 3:
                long.cancelled = True

        long = Row(states[0], 60, least=60, on_token=hang_up, on_done=gone.on_done)
        for row in rows:
            loop_thread.submit(head, row)
        ended = await asyncio.gather(*(w.done for w in waiters))
        assert [ids for ids, _ in ended] == want
        streamed = [waiters[0].tokens.get_nowait() for _ in range(waiters[0].tokens.qsize())]
        assert streamed == want[0]
        assert loop_thread.snapshot()["rows_per_step"] <= 2  # the row limit held
        loop_thread.submit(head, long)
        _, why = await asyncio.wait_for(gone.done, 5)
        assert why == "cancelled" and long.produced <= 4  # it left at the next step
        began = time.monotonic()
        while loop_thread.in_flight and time.monotonic() - began < 1:
            await asyncio.sleep(0.01)
        assert loop_thread.in_flight == 0

    import time

    try:
        asyncio.run(run())
    finally:
        loop_thread.stop()


def test_a_task_asking_more_tokens_than_its_decoder_has_positions_is_refused_naming_the_key() -> None:
    from polytask.config import ConfigError
    from polytask.model.decoding import check_position_limits
    from polytask.tasks import GenerationSpec, TaskSpec

    specs = [
        TaskSpec("sentiment", "classification", ["neg", "pos"]),
        TaskSpec("summary", "generation", [], generation=GenerationSpec(max_new_tokens=100)),
        TaskSpec("title", "generation", [], generation=GenerationSpec(max_new_tokens=100)),
    ]
    heads = {"summary": _bart_head(), "title": _t5_head()}  # T5: relative positions, no limit
    with pytest.raises(ConfigError) as caught:
        check_position_limits(specs, heads)
    (problem,) = caught.value.problems
    assert problem == (
        "tasks[1].generation.max_new_tokens: 100 is over the 63 new tokens task 'summary's "
        "decoder has positions for (max_position_embeddings 64); set it to at most 63"
    )
    fits = TaskSpec("summary", "generation", [], generation=GenerationSpec(max_new_tokens=63))
    check_position_limits([specs[0], fits], heads)


def test_beam_search_stops_when_its_caller_is_cancelled() -> None:
    head = _t5_head()
    states, _ = _inputs(2)
    padded = torch.stack([s[:3] for s in states])
    mask = torch.ones(2, 3, dtype=torch.long)
    steps = []

    def stop() -> bool:
        steps.append(1)
        return len(steps) >= 3

    out = generate(head, padded, mask, max_new_tokens=40, min_new_tokens=40, num_beams=3, stop=stop)
    assert len(steps) == 3 and all(len(ids) <= 3 for ids in out)
    full = generate(head, padded, mask, max_new_tokens=40, min_new_tokens=40, num_beams=3)
    assert all(len(ids) == 40 for ids in full)


def test_the_cached_token_limit_holds_rows_back_until_others_leave() -> None:
    import asyncio

    from polytask.serve.decode_loop import DecodeLoop, Waiter

    head = _new_head()
    states, _ = _inputs(4)
    states, caps = [s[:3] for s in states], [8] * 4  # each row reserves 3 + 8 + 1 = 12 tokens
    limit = 23  # every row fits alone, no two together
    loop_thread = DecodeLoop(max_rows=64, max_cached_tokens=limit, threads=1)

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        waiters = [Waiter(loop, stream=False) for _ in states]
        for s, c, w in zip(states, caps, waiters):
            loop_thread.submit(head, Row(s, c, on_done=w.on_done))
        return [ids for ids, _ in await asyncio.gather(*(w.done for w in waiters))]

    try:
        assert asyncio.run(run()) == _static(head, states, caps)
        assert loop_thread.snapshot()["rows_per_step"] == 1.0  # never two rows at once
    finally:
        loop_thread.stop()


def test_sampling_is_refused_for_a_beam_search_task_naming_the_field() -> None:
    from polytask.serve.validation import APIError, check_sampling
    from polytask.tasks import GenerationSpec, TaskSpec

    specs = {
        "greedy": TaskSpec("greedy", "generation", []),
        "beams": TaskSpec("beams", "generation", [], generation=GenerationSpec(num_beams=4)),
    }
    sampling = {"temperature": 0.7, "top_p": None, "seed": 1}
    assert check_sampling(specs, ["greedy"], sampling) == sampling
    with pytest.raises(APIError) as caught:
        check_sampling(specs, ["greedy", "beams"], sampling)
    assert caught.value.status == 422 and "body.temperature" in caught.value.message
