"""Prediction from raw text, split into the encoder half and the head half.

Serving runs the halves in different deployments; `Predictor` runs both in one process (MLflow
pyfunc, `polytask predict`, tests). Sharing these two functions is what keeps their answers equal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from polytask.model.inputs import split_input, texts_and_pairs
from polytask.model.network import pool
from polytask.tasks import TaskSpec


@dataclass
class Encoded:
    """What the encoder hands a head for one input: only the parts the requested heads need."""

    pooled: np.ndarray | None = None
    tokens: np.ndarray | None = None
    word_ids: list[int | None] | None = None
    word_spans: list[tuple[int, int]] | None = None


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
    timings: dict[str, float] | None = None,
) -> list[Encoded]:
    """One forward pass for a batch padded to its own longest input (never to max_length).
    `timings`, when given, gains the seconds spent in `tokenize` and `encoder_forward`."""
    began = time.perf_counter()
    enc = tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_offsets_mapping=need_tokens,
        return_tensors="pt",
    )
    offsets = enc.pop("offset_mapping", None)
    tokenized = time.perf_counter()
    inputs = {k: v.to(device) for k, v in enc.items()}
    hidden = encoder(**inputs).last_hidden_state
    pooled = pool(hidden, inputs["attention_mask"], pooling).float().cpu().numpy() if need_pooled else None
    states = hidden.float().cpu().numpy() if need_tokens else None
    if timings is not None:
        timings["tokenize"] = timings.get("tokenize", 0.0) + tokenized - began
        timings["encoder_forward"] = (
            timings.get("encoder_forward", 0.0) + time.perf_counter() - tokenized
        )
    lengths = enc["attention_mask"].sum(1).tolist()
    out = []
    for i, n in enumerate(lengths):
        item = Encoded(pooled=pooled[i] if pooled is not None else None)
        if need_tokens:
            word_ids = enc.word_ids(i)[:n]
            item.tokens = states[i, :n]
            item.word_ids = word_ids
            item.word_spans = _word_spans(word_ids, offsets[i, :n].tolist())
        out.append(item)
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
    if kind.level == "sequence":
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
        paired = [split_input(item)[1] is not None for item in inputs]
        if not tasks:
            tasks = [t for t in self.tasks if all(paired) or not self.model.specs[t].pair]
            tasks = tasks or self.tasks
        for t in tasks:
            if t not in self.model.specs:
                raise KeyError(f"unknown task '{t}'; this model has: {', '.join(self.tasks)}")
        pair_tasks = [t for t in tasks if self.model.specs[t].pair]
        if pair_tasks and not all(paired):
            raise ValueError(
                f"input {paired.index(False)} has no text_pair, but task(s) "
                f"{', '.join(pair_tasks)} compare two texts: give "
                '{"text": "...", "text_pair": "..."}'
            )
        results: list[dict[str, Any]] = [{} for _ in inputs]
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            for task, answers in self._predict_chunk(chunk, tasks).items():
                for offset, answer in enumerate(answers):
                    results[start + offset][task] = answer
        return results

    def _predict_chunk(
        self, chunk: list[str | dict[str, Any]], tasks: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for pair_view in (False, True):
            view = [t for t in tasks if self.model.specs[t].pair == pair_view]
            if not view:
                continue
            levels = {self.model.specs[t].task_kind.level for t in view}
            texts, pairs = texts_and_pairs(chunk, pair_view)
            items = encode_batch(
                self.model.encoder,
                self.tokenizer,
                texts,
                pairs,
                max_length=self.max_length,
                pooling=self.model.pooling,
                need_pooled="sentence" in levels,
                need_tokens=bool(levels & {"token", "sequence"}),
                device=self.device,
            )
            for t in view:
                out[t] = run_head(self.model.heads[t], self.model.specs[t], items, texts)
        return out
