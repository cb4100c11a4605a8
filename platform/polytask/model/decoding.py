"""Iteration-level (continuous) batching for a generation head: rows join and leave at every step.

`StepBatch` owns the rows decoding now. Each row has its own history, kept in one padded batch:
self-attention keys/values are left-padded (a row that joined later has fewer columns; a mask
hides the rest) and each row feeds its own position id; cross-attention keys/values are computed
once, when the row is admitted (a one-token "prefill" forward over its encoder states), and
right-padded to the widest encoder input. A row leaves the moment it ends (EOS, its cap, its
caller gone): its slice is dropped and columns no row needs any more are cut, so a finished row
never costs another step (static batching decodes every row until the longest ends).

Per-row position ids: a `new` (BERT) decoder takes them as `position_ids`; BART/Marian-style
decoders compute positions from the cache length, so their `embed_positions` module is hooked to
read the rows' own; T5's relative position bias depends on key-query distance only, which left
padding keeps. Greedy answers equal `generation.generate`'s token for token (tested).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polytask.model.generation import CHECKPOINT


@dataclass(eq=False)
class Row:
    """One input decoding: its encoder states (tokens, hidden) and how to decode and report it.

    `on_token(id)` hears each new token (not EOS); `on_done(ids, reason)` once, with the ids and
    why it ended: "eos", "cap", "cancelled", "deadline". `cancelled` may be set from any thread:
    the row leaves at the next step. `deadline` is `time.monotonic()` based."""

    states: torch.Tensor
    cap: int
    least: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    no_repeat_ngram_size: int = 0
    deadline: float | None = None
    on_token: Callable[[int], None] | None = None
    on_done: Callable[[list[int], str], None] | None = None
    cancelled: bool = False
    ids: list[int] = field(default_factory=list)  # tokens produced, PAD left out (as `generate`)
    produced: int = 0  # tokens produced, PAD included: what the cap and the minimum count
    history: list[int] = field(default_factory=list)  # every token fed (n-gram blocking reads it)
    generator: torch.Generator | None = None
    admitted_at: float | None = None
    error: BaseException | None = None  # why it "failed" (its input could not be decoded)

    @property
    def reserve(self) -> int:
        """Tokens this row may hold in the cache at most: its encoder input and its cap."""
        return int(self.states.shape[0]) + self.cap + 1

    def gone(self, now: float) -> str | None:
        """Why this row must leave before the next step (None: it decodes on)."""
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "deadline"
        return None


@dataclass(frozen=True)
class Rules:
    """A checkpoint's own generation settings that every row obeys (its generation config)."""

    start: int
    eos: int
    pad: int
    forced_bos: int | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, head: Any) -> Rules:
        """The head's special ids plus its decoder's generation config: a forced first token and
        banned token sequences (forced EOS is the row's cap: the last token before it ends)."""
        config = getattr(head.decoder, "generation_config", None)
        forced = getattr(config, "forced_bos_token_id", None)
        bad = getattr(config, "bad_words_ids", None) or []
        return cls(
            start=head.start_id,
            eos=head.eos_id,
            pad=head.pad_id,
            forced_bos=None if forced is None else int(forced),
            bad_words=tuple(tuple(int(t) for t in words) for words in bad),
        )


def position_limit(decoder: Any) -> int | None:
    """Most new tokens `decoder` can produce (see `model.positions.position_limit`)."""
    from polytask.model.positions import position_limit as of_config

    config = getattr(decoder, "config", None)
    return None if config is None else of_config(config)


def check_position_limits(specs: Sequence[Any], heads: dict[str, Any]) -> None:
    """Refuse (ConfigError naming `tasks[i].generation.max_new_tokens`) a task that asks for
    more new tokens than its decoder has positions for; `specs` in the config's task order."""
    from polytask.config import ConfigError

    problems = []
    for i, spec in enumerate(specs):
        head = heads.get(spec.name)
        limit = position_limit(head.decoder) if head is not None else None
        if limit is not None and spec.generation.max_new_tokens > limit:
            problems.append(
                f"tasks[{i}].generation.max_new_tokens: {spec.generation.max_new_tokens} is over "
                f"the {limit} new tokens task '{spec.name}'s decoder has positions for "
                f"(max_position_embeddings {limit + 1}); set it to at most {limit}"
            )
    if problems:
        raise ConfigError(problems)


class StepBatch:
    """The rows one head decodes together; `admit` adds rows, `step` advances every row by one
    token and drops those that ended. Not thread-safe: one thread owns it (the decode loop)."""

    def __init__(self, head: Any) -> None:
        self.head = head
        self.rules = Rules.of(head)
        self.device = next(head.parameters()).device
        self.dtype = next(head.parameters()).dtype
        self.rows: list[Row] = []
        self.self_kv: list[list[torch.Tensor]] = []  # per layer [keys, values] (B, H, L, D)
        self.cross_kv: list[list[torch.Tensor]] = []  # per layer (B, H, S, D)
        self.self_mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L)
        self.enc_mask = torch.zeros(0, 0, dtype=torch.long)  # (B, S)
        self.states = torch.zeros(0, 0, 0)  # (B, S, hidden): shapes for the masks only
        self.fed = torch.zeros(0, dtype=torch.long)  # (B,) tokens each row has in its cache
        self.last = torch.zeros(0, dtype=torch.long)  # (B,) the token each row feeds next
        self._positions: torch.Tensor | None = None
        self._hook = _position_hook(head, self)
        self.forward_s = 0.0  # time in decoder forwards (the per-step CPU breakdown)
        self.pick_s = 0.0  # choosing tokens (processors, sampling)
        self.book_s = 0.0  # padding, stacking and cutting caches

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        """Take the position hook off the head (the batch is done with it)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def cached_tokens(self) -> int:
        """Tokens the rows reserve (encoder inputs + caps): what the replica's limit counts."""
        return sum(row.reserve for row in self.rows)

    @torch.inference_mode()
    def admit(self, rows: Sequence[Row]) -> list[tuple[Row, int | None, str | None]]:
        """Prefill `rows`: one forward from the start token computes their cross-attention
        keys/values and first token; they join the batch. Returns (row, token, ended) each."""
        if not rows:
            return []
        began = time.perf_counter()
        for row in rows:
            if row.seed is not None:
                row.generator = torch.Generator(device="cpu").manual_seed(int(row.seed))
            row.admitted_at = time.monotonic()
        width = max(int(r.states.shape[0]) for r in rows)
        hidden = int(rows[0].states.shape[1])
        states = torch.zeros(len(rows), width, hidden, dtype=self.dtype)
        enc_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            states[i, : row.states.shape[0]] = row.states
            enc_mask[i, : row.states.shape[0]] = 1
        states, enc_mask = states.to(self.device), enc_mask.to(self.device)
        start = torch.full((len(rows), 1), self.rules.start, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(len(rows), 1, dtype=torch.long, device=self.device)
        self.book_s += time.perf_counter() - began
        logits, cache = self._forward(start, torch.ones_like(start), states, enc_mask, None)
        began = time.perf_counter()
        new_self = [[layer.keys, layer.values] for layer in cache.self_attention_cache.layers]
        new_cross = [[layer.keys, layer.values] for layer in cache.cross_attention_cache.layers]
        self._merge(list(rows), new_self, new_cross, states, enc_mask)
        self.book_s += time.perf_counter() - began
        return self._advance(logits, first=len(self.rows) - len(rows))

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int | None, str | None]]:
        """One token for every row (after dropping rows whose caller is gone or whose deadline
        passed): (row, token or None, why it ended or None) for each row touched."""
        now = time.monotonic()
        out: list[tuple[Row, int | None, str | None]] = []
        gone = [i for i, row in enumerate(self.rows) if row.gone(now)]
        for i in gone:
            out.append((self.rows[i], None, self.rows[i].gone(now)))
        if gone:
            self._keep([i for i in range(len(self.rows)) if i not in set(gone)])
        if not self.rows:
            return out
        from transformers import EncoderDecoderCache

        began = time.perf_counter()
        cache = EncoderDecoderCache(_cache_of(self.self_kv), _cache_of(self.cross_kv))
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=self.device)
        mask = torch.cat([self.self_mask, ones], dim=1)
        self._positions = self.fed.unsqueeze(1)
        self.book_s += time.perf_counter() - began
        logits, cache = self._forward(self.last.unsqueeze(1), mask, self.states, self.enc_mask, cache)
        self.self_kv = [[layer.keys, layer.values] for layer in cache.self_attention_cache.layers]
        self.self_mask = mask
        self.fed = self.fed + 1
        return out + self._advance(logits, first=0)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor, enc_mask: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """Last-position logits (B, vocab) in float32 and the cache holding this step's keys."""
        from transformers import DynamicCache, EncoderDecoderCache

        began = time.perf_counter()
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        decoder = self.head.decoder
        if self.head.source == CHECKPOINT:
            from transformers.modeling_outputs import BaseModelOutput

            out = decoder(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                attention_mask=enc_mask,
                decoder_input_ids=ids,
                decoder_attention_mask=mask,
                cache=cache,
                use_cache=True,
            )
        else:
            out = decoder(
                input_ids=ids,
                attention_mask=mask,
                position_ids=self._positions,
                encoder_hidden_states=states,
                encoder_attention_mask=enc_mask,
                cache=cache,
                use_cache=True,
            )
        self._positions = None  # the position hook answers only this batch's own forwards
        self.forward_s += time.perf_counter() - began
        return out.logits[:, -1, :].float(), cache

    def _merge(
        self,
        rows: list[Row],
        new_self: list[list[torch.Tensor]],
        new_cross: list[list[torch.Tensor]],
        states: torch.Tensor,
        enc_mask: torch.Tensor,
    ) -> None:
        """Append prefilled rows: their one self-attention column left-padded to the batch's
        width, the batch's (or their) cross-attention right-padded to the wider encoder input."""
        n = len(rows)
        fed = torch.ones(n, dtype=torch.long, device=self.device)
        if not self.rows:
            self.self_kv, self.cross_kv = new_self, new_cross
            self.self_mask = torch.ones(n, 1, dtype=torch.long, device=self.device)
            self.states, self.enc_mask, self.fed = states, enc_mask, fed
            self.last = torch.zeros(n, dtype=torch.long, device=self.device)
            self.rows = rows
            return
        width = self.self_mask.shape[1]
        self.self_kv = [
            [torch.cat([old, _pad(new, width, dim=2, left=True)], dim=0) for old, new in zip(o, nw)]
            for o, nw in zip(self.self_kv, new_self)
        ]
        mask = _pad(torch.ones(n, 1, dtype=torch.long, device=self.device), width, dim=1, left=True)
        self.self_mask = torch.cat([self.self_mask, mask], dim=0)
        enc = max(self.enc_mask.shape[1], enc_mask.shape[1])
        self.cross_kv = [
            [torch.cat([_pad(old, enc, dim=2), _pad(new, enc, dim=2)], dim=0) for old, new in zip(o, nw)]
            for o, nw in zip(self.cross_kv, new_cross)
        ]
        self.enc_mask = torch.cat([_pad(self.enc_mask, enc, dim=1), _pad(enc_mask, enc, dim=1)], dim=0)
        self.states = torch.cat([_pad(self.states, enc, dim=1), _pad(states, enc, dim=1)], dim=0)
        self.fed = torch.cat([self.fed, fed])
        self.last = torch.cat([self.last, torch.zeros(n, dtype=torch.long, device=self.device)])
        self.rows = self.rows + rows

    def _advance(self, logits: torch.Tensor, first: int) -> list[tuple[Row, int | None, str | None]]:
        """Choose each row's next token (rows from `first` on), report it, drop ended rows."""
        began = time.perf_counter()
        rows = self.rows[first:]
        tokens = pick_tokens(rows, logits, self.rules)  # logits: rows[first:] only
        self.last[first:] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        out, keep = [], list(range(first))
        for i, (row, token) in enumerate(zip(rows, tokens), start=first):
            if token == self.rules.eos:
                out.append((row, None, "eos"))
                continue
            row.produced += 1
            row.history.append(token)
            if token != self.rules.pad:
                row.ids.append(token)
            ended = "cap" if row.produced >= row.cap else None
            out.append((row, None if token == self.rules.pad else token, ended))
            if ended is None:
                keep.append(i)
        self.pick_s += time.perf_counter() - began
        if len(keep) < len(self.rows):
            self._keep(keep)
        return out

    def _keep(self, keep: list[int]) -> None:
        """Only rows `keep` stay; columns no remaining row needs are cut from both caches."""
        began = time.perf_counter()
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.self_kv, self.cross_kv = [], []
            self.fed = self.fed[:0]
            self.last = self.last[:0]
            self.self_mask, self.enc_mask = self.self_mask[:0], self.enc_mask[:0]
            self.states = self.states[:0]
            self.book_s += time.perf_counter() - began
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.fed, self.last = self.fed[index], self.last[index]
        cut = self.self_mask.shape[1] - int(self.fed.max())  # left columns every row pads
        enc_mask = self.enc_mask[index]
        enc = int(enc_mask.sum(dim=1).max())
        self.self_kv = [[t[index, :, cut:] for t in kv] for kv in self.self_kv]
        self.cross_kv = [[t[index, :, :enc] for t in kv] for kv in self.cross_kv]
        self.self_mask = self.self_mask[index, cut:]
        self.enc_mask = enc_mask[:, :enc]
        self.states = self.states[index, :enc]
        self.book_s += time.perf_counter() - began


def _cache_of(kv: list[list[torch.Tensor]]) -> Any:
    """A DynamicCache holding these per-layer keys/values as they are (no copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = []
    for keys, values in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = layers
    return cache


def _pad(t: torch.Tensor, width: int, dim: int, left: bool = False) -> torch.Tensor:
    """`t` zero-padded along `dim` to `width` (on the left for left-padded self-attention)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    zeros = t.new_zeros(shape)
    return torch.cat([zeros, t] if left else [t, zeros], dim=dim)


def _position_hook(head: Any, batch: StepBatch) -> Any:
    """For decoders with a position table read from the cache length (BART, Marian, ...): a hook
    that makes it return each row's own position instead. None where no hook is needed."""
    if head.source != CHECKPOINT:
        return None
    decoder = head.decoder.get_decoder() if hasattr(head.decoder, "get_decoder") else None
    table = getattr(decoder, "embed_positions", None)
    if table is None:
        return None  # relative positions (T5): left padding keeps every key-query distance
    if not isinstance(table, nn.Embedding):
        raise TypeError(
            f"continuous batching cannot set per-row positions for a {type(table).__name__}; "
            "serve this model with generation_head_options.decode: static"
        )
    offset = int(getattr(table, "offset", 0))

    def rows_positions(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        positions = batch._positions
        if positions is None:
            return output
        return nn.functional.embedding(positions + offset, module.weight).to(output.dtype)

    return table.register_forward_hook(rows_positions)


def pick_tokens(rows: Sequence[Row], logits: torch.Tensor, rules: Rules) -> list[int]:
    """Each row's next token: its length rules (no EOS under its minimum), the checkpoint's
    rules (forced first token, banned words), n-gram blocking, then greedy or its sampling."""
    scores = logits.clone()
    for i, row in enumerate(rows):
        produced = row.produced
        if produced < row.least:
            scores[i, rules.eos] = -math.inf
        for words in rules.bad_words:
            prefix = words[:-1]
            if not prefix or tuple(row.history[-len(prefix) :]) == prefix:
                scores[i, words[-1]] = -math.inf
        if row.no_repeat_ngram_size > 0:
            for token in _banned_ngrams(row.history, row.no_repeat_ngram_size, rules.start):
                scores[i, token] = -math.inf
        if produced == 0 and rules.forced_bos is not None:
            scores[i] = -math.inf
            scores[i, rules.forced_bos] = 0.0
    greedy = scores.argmax(dim=-1).tolist()
    out = []
    for i, row in enumerate(rows):
        if row.temperature <= 0:
            out.append(int(greedy[i]))
        else:
            out.append(_sample(scores[i].cpu(), row.temperature, row.top_p, row.generator))
    return out


def _banned_ngrams(ids: list[int], n: int, start: int) -> list[int]:
    """Tokens that would repeat an n-gram already in the row (start token included, as HF)."""
    seq = [start, *ids]
    if len(seq) < n:
        return []
    tail = tuple(seq[len(seq) - n + 1 :])
    return [seq[j + n - 1] for j in range(len(seq) - n + 1) if tuple(seq[j : j + n - 1]) == tail]


def _sample(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token drawn from softmax(scores / temperature) cut to the smallest set holding top_p."""
    probs = torch.softmax(scores / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def decode_rows(head: Any, rows: list[Row], max_rows: int = 64) -> list[list[int]]:
    """In process: decode `rows` with continuous batching (at most `max_rows` at once, the
    others joining as rows end) and return each row's ids; tests and benchmarks use it."""
    batch = StepBatch(head)
    waiting = list(rows)
    done: dict[int, list[int]] = {}
    while waiting or len(batch):
        room = max_rows - len(batch)
        joining, waiting = waiting[:room], waiting[room:]
        events = batch.admit(joining) if joining else batch.step()
        for row, _, ended in events:
            if ended is not None:
                done[id(row)] = list(row.ids)
    batch.close()
    return [done[id(row)] for row in rows]
