"""Prediction from raw text, split into the encoder half and the head half.

Serving runs the halves in different deployments; `Predictor` runs both in one process (MLflow
pyfunc, `polytask predict`, tests). Sharing these two functions is what keeps their answers equal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from polytask.model.inputs import split_input
from polytask.model.network import pool
from polytask.model.plan import plan_requests, request_tasks
from polytask.tasks import TaskSpec


@dataclass
class Encoded:
    """What the encoder hands a head for one input: only the parts the requested heads need."""

    pooled: np.ndarray | None = None
    tokens: np.ndarray | None = None
    word_ids: list[int | None] | None = None
    word_spans: list[tuple[int, int]] | None = None


def plan_passes(
    lengths: Sequence[int], max_inputs: int, overhead_tokens: float | None
) -> list[list[int]]:
    """Input indices (by token length, shortest first) cut into forward passes of at most
    `max_inputs`. A pass costs `overhead_tokens` plus its padded tokens (inputs × its longest);
    the cuts minimise the sum, so a mixed batch pays neither for padding short inputs to a long
    one nor for many small passes. `overhead_tokens=None`: plain cuts every `max_inputs`."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    if overhead_tokens is None or math.isinf(overhead_tokens):
        return [order[i : i + max_inputs] for i in range(0, n, max_inputs)]
    cost = [0.0] + [math.inf] * n  # cost[j]: the cheapest plan of the j shortest inputs
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - max_inputs), j):
            here = cost[i] + overhead_tokens + (j - i) * longest
            if here < cost[j]:
                cost[j], cut[j] = here, i
    passes, j = [], n
    while j > 0:
        passes.append(order[cut[j] : j])
        j = cut[j]
    return passes[::-1]


@torch.inference_mode()
def pass_overhead_tokens(encoder: nn.Module, max_length: int, device: str = "cpu") -> float:
    """A forward pass's fixed cost in padded tokens' worth, timed on this model, device and thread
    count (a one-input pass against a 4-input one, best of three): what `plan_passes` weighs a
    pass against padding with. On a GPU the fixed cost dwarfs padding, so passes stay large."""
    short, wide = min(8, max_length), min(32, max_length)

    def seconds(rows: int, width: int) -> float:
        ids = torch.ones((rows, width), dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        best = math.inf
        for _ in range(4):  # the first is a warm-up
            began = time.perf_counter()
            encoder(input_ids=ids, attention_mask=mask)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - began)
        return best

    t_short, t_wide = seconds(1, short), seconds(4, wide)
    per_token = (t_wide - t_short) / max(4 * wide - short, 1)
    if per_token <= 0:
        return math.inf
    return min(max(t_short / per_token - short, 0.0), 1e6)


@torch.inference_mode()
def encode_batch(
    encoder: nn.Module,
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    *,
    max_length: int,
    pooling: str,
    need_pooled: bool,
    need_tokens: bool,
    device: str = "cpu",
    max_pass_inputs: int | None = None,
    overhead_tokens: float | None = None,
    timings: dict[str, float] | None = None,
    pass_sizes: list[int] | None = None,
) -> list[Encoded]:
    """Tokenize once, then forward in passes planned by `plan_passes` (at most `max_pass_inputs`
    each, all at once by default), each padded to its own longest input (never to max_length).
    `timings` gains the seconds spent in `tokenize` and `encoder_forward`; `pass_sizes` each
    pass's inputs. Answers come back in input order."""
    began = time.perf_counter()
    enc = tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=need_tokens,
    )
    offsets = enc.pop("offset_mapping", None)
    features = dict(enc)
    lengths = [len(ids) for ids in features["input_ids"]]
    plan = plan_passes(lengths, max_pass_inputs or max(len(texts), 1), overhead_tokens)
    tokenized = time.perf_counter()
    out: list[Encoded] = [Encoded() for _ in texts]
    for chunk in plan:
        batch = tokenizer.pad(
            {key: [values[i] for i in chunk] for key, values in features.items()},
            padding_side="right",  # the states of input i are its first lengths[i] rows
            return_tensors="pt",
        )
        inputs = {k: v.to(device) for k, v in batch.items()}
        hidden = encoder(**inputs).last_hidden_state
        if need_pooled:
            pooled = pool(hidden, inputs["attention_mask"], pooling).float().cpu().numpy()
        states = hidden.float().cpu().numpy() if need_tokens else None
        for row, i in enumerate(chunk):
            if need_pooled:
                out[i].pooled = pooled[row]
            if states is not None:  # unpadded tokenization: word ids and offsets are input i's
                word_ids = enc.word_ids(i)
                out[i].tokens = states[row, : lengths[i]]
                out[i].word_ids = word_ids
                out[i].word_spans = _word_spans(word_ids, offsets[i])
        if pass_sizes is not None:
            pass_sizes.append(len(chunk))
    if timings is not None:
        timings["tokenize"] = timings.get("tokenize", 0.0) + tokenized - began
        timings["encoder_forward"] = (
            timings.get("encoder_forward", 0.0) + time.perf_counter() - tokenized
        )
    return out


def _word_spans(word_ids: list[int | None], offsets: list[list[int]]) -> list[tuple[int, int]]:
    """Character span of each word: from its first sub-token's start to its last one's end."""
    spans: dict[int, tuple[int, int]] = {}
    for wid, (start, end) in zip(word_ids, offsets):
        if wid is None:
            continue
        s0, _ = spans.get(wid, (start, end))
        spans[wid] = (s0, end)
    return [spans.get(w, (0, 0)) for w in range(max(spans, default=-1) + 1)]


@torch.inference_mode()
def run_head(
    head: nn.Module, spec: TaskSpec, items: list[Encoded], texts: list[str]
) -> list[dict[str, Any]]:
    """Apply one head to encoder outputs and decode each input into its JSON answer."""
    kind = spec.task_kind
    device = next(head.parameters()).device
    if spec.is_generation:
        return generate_answers(head, spec, items)
    if kind.level == "token":
        results = []
        for item, text in zip(items, texts):
            logits = head(torch.from_numpy(item.tokens).to(device)).float().cpu().numpy()
            results.append(
                kind.decode(
                    logits, spec, text=text, word_ids=item.word_ids, word_spans=item.word_spans
                )
            )
        return results
    pooled = torch.from_numpy(np.stack([item.pooled for item in items])).to(device)
    logits = head(pooled).float().cpu().numpy()
    return [kind.decode(row, spec) for row in logits]


def pad_states(items: list[Encoded], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input token states (each its own length) → one zero-padded batch and its mask."""
    width = max(item.tokens.shape[0] for item in items)
    hidden = items[0].tokens.shape[1]
    states = np.zeros((len(items), width, hidden), dtype=np.float32)
    mask = np.zeros((len(items), width), dtype=np.int64)
    for i, item in enumerate(items):
        states[i, : item.tokens.shape[0]] = item.tokens
        mask[i, : item.tokens.shape[0]] = 1
    return torch.from_numpy(states).to(device), torch.from_numpy(mask).to(device)


@torch.inference_mode()
def generate_answers(
    head: nn.Module, spec: TaskSpec, items: list[Encoded], on_step: Any = None, **overrides: Any
) -> list[dict[str, Any]]:
    """A generation head's answers ({"text": ...} per input) from the encoder's token states.
    `overrides` (max_new_tokens — one or one per input —, num_beams, length_penalty,
    no_repeat_ngram_size) replace the task's own settings; `on_step` streams (see `generate`)."""
    from polytask.model.generation import generate_text, generation_settings

    param = next(head.parameters())
    states, mask = pad_states(items, param.device)
    texts = generate_text(
        head, states.to(param.dtype), mask, on_step=on_step, **generation_settings(spec, **overrides)
    )
    return [spec.task_kind.decode(text, spec) for text in texts]


class Predictor:
    """A whole bundle in one process: `predict(inputs, tasks)` → one {task: answer} per input."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, device: str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self._pass_overhead: float | None = None  # measured on the first prediction

    @classmethod
    def from_bundle(cls, path: str, device: str = "cpu") -> Predictor:
        from polytask.model.bundle import load_bundle

        model, tokenizer, manifest = load_bundle(path, device)
        return cls(model, tokenizer, manifest.max_length, device)

    @property
    def tasks(self) -> list[str]:
        return list(self.model.specs)

    def predict(
        self, inputs: list[str | dict[str, Any]], tasks: list[str] | None = None, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Every task when `tasks` is empty, pair tasks only when every input has a text_pair (as
        the HTTP API does); a named pair task needs a text_pair on every input."""
        specs = self.model.specs
        tasks = request_tasks(specs, inputs, tasks)
        for t in tasks:
            if t not in specs:
                raise KeyError(f"unknown task '{t}'; this model has: {', '.join(self.tasks)}")
        paired = [split_input(item)[1] is not None for item in inputs]
        pair_tasks = [t for t in tasks if specs[t].pair]
        if pair_tasks and not all(paired):
            raise ValueError(
                f"input {paired.index(False)} has no text_pair, but task(s) "
                f"{', '.join(pair_tasks)} compare two texts: give "
                '{"text": "...", "text_pair": "..."}'
            )
        results: list[dict[str, Any]] = []
        for start in range(0, len(inputs), batch_size):
            results += self._predict_chunk(inputs[start : start + batch_size], tasks)
        return results

    def _predict_chunk(
        self, chunk: list[str | dict[str, Any]], tasks: list[str]
    ) -> list[dict[str, Any]]:
        """One forward per view of the chunk's plan, then each task's head on its view."""
        plan = plan_requests(self.model.specs, [(chunk, tasks)])
        if self._pass_overhead is None:
            self._pass_overhead = pass_overhead_tokens(
                self.model.encoder, self.max_length, self.device
            )
        answers = []
        for view in plan.views:
            items = encode_batch(
                self.model.encoder,
                self.tokenizer,
                view.texts,
                view.pairs,
                max_length=self.max_length,
                pooling=self.model.pooling,
                need_pooled=any(view.pooled),
                need_tokens=any(view.tokens),
                device=self.device,
                overhead_tokens=self._pass_overhead,
            )
            for call in view.calls:
                mine = items if call.positions is None else [items[i] for i in call.positions]
                spec = self.model.specs[call.task]
                answers.append(run_head(self.model.heads[call.task], spec, mine, view.texts_of(call)))
        (results,) = plan.answers(answers)
        return results
