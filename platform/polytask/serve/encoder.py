"""The Encoder deployment: tokenize + encoder forward for every Ingress replica, one shared model.

Calls that arrive while a forward runs are encoded together. Each output carries the encoder
fingerprint and model reference, so a head always decodes it with the head trained against that
encoder, even while old and new replicas mix in a rolling update or an in-place `reconfigure`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from ray import serve

from polytask.model.plan import views_of
from polytask.serve.batching import MicroBatcher
from polytask.serve.colocated import ColocatedHeads, HeadWatch
from polytask.serve.health import Health, apply_deadline
from polytask.serve.metrics import ServeMetrics
from polytask.serve.refs import local_bundle, model_from_config, pin_model_uri
from polytask.serve.replica import replica_identity
from polytask.serve.validation import InputRejected


@dataclass
class _EncoderState:
    """One loaded encoder version; swapped as a whole so a batch never mixes versions."""

    ref: str
    encoder: Any
    tokenizer: Any
    fingerprint: str
    pooling: str
    max_length: int
    heads: ColocatedHeads  # the heads placed with_encoder, loaded for this encoder
    pass_overhead: float  # a forward pass's fixed cost in padded tokens (plan_passes)


# (each pass's inputs, stage seconds) per text view of one batch
_Passes = list[tuple[list[int], dict[str, float]]]


@dataclass
class _Item:
    text: str
    pair: str | None
    need_pooled: bool
    need_tokens: bool


@dataclass
class _EncodeCall:
    """One `encode` call (one Ingress batch, or one direct caller): encoded together with every
    other call that arrives while the encoder is busy."""

    items: list[_Item]


@serve.deployment(name="Encoder")
class Encoder:
    """Tokenize + encoder forward; calls arriving while a forward runs (from any Ingress replica)
    are encoded together: tokenized once, length-sorted and cut into passes of at most
    `max_batch_size` inputs wherever padding would cost more than another pass."""

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.005,
        pass_overhead_tokens: float | None = None,
        heads: tuple[str, ...] = (),
    ) -> None:
        """`heads`: the tasks whose heads run here, on this replica's output (`with_encoder`);
        `pass_overhead_tokens`: None measures it whenever the replica loads encoder weights."""
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "device: cuda, but this Encoder replica sees no GPU; give the Encoder deployment "
                "ray_actor_options.num_gpus: 1, or set device: cpu"
            )
        self.device = device
        self.max_batch_size = max_batch_size
        self.pass_overhead_tokens = pass_overhead_tokens
        self.health = Health("Encoder")
        self.calls = 0
        self.inputs = 0
        self.passes: list[int] = []
        self.metrics = ServeMetrics(model)
        self.colocated = tuple(heads)
        self.head_watch = HeadWatch(self.colocated, self.metrics)
        self.batcher: MicroBatcher[_EncodeCall, tuple[_EncoderState, list[Any]]] = MicroBatcher(
            self._encode_calls,
            size=lambda call: len(call.items),
            max_size=max(max_batch_size, 1024),
            max_in_flight=1,
            wait_s=batch_wait_timeout_s,
            on_batch=lambda size, waits: self.metrics.batch_formed("encoder", size, waits),
        )
        self.state = self._load(model)
        self.metrics.set_model(self.state.ref)

    def _load(self, ref: str) -> _EncoderState:
        from polytask.model.bundle import BundleError, load_encoder_part, read_manifest
        from polytask.model.inference import pass_overhead_tokens

        path = local_bundle(ref)
        manifest = read_manifest(path)
        encoder, tokenizer, fingerprint = load_encoder_part(path, self.device)
        self.loads = getattr(self, "loads", 0) + 1  # weight loads by this replica (stats)
        if fingerprint != manifest.fingerprint:
            raise BundleError(
                f"{ref}: encoder weights have fingerprint {fingerprint} but polytask.json says "
                f"{manifest.fingerprint}; the bundle was modified or is incomplete"
            )
        heads = ColocatedHeads.load(path, self.colocated, fingerprint)
        overhead = self.pass_overhead_tokens
        if overhead is None:
            overhead = pass_overhead_tokens(encoder, manifest.max_length, self.device)
        return _EncoderState(
            ref, encoder, tokenizer, fingerprint, manifest.pooling, manifest.max_length, heads,
            overhead,
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """`user_config: {model: URI}` switches the encoder in place (no replica restart); a
        version with the same encoder (e.g. one that only added heads) swaps the reference
        without reloading the weights."""
        apply_deadline(self.health, config)
        self.head_watch.reconfigure(config)
        model = model_from_config(config)
        if model is not None:
            ref = pin_model_uri(model)
            if ref != self.state.ref:
                self.state = self._same_encoder(ref) or self._load(ref)
                self.metrics.set_model(ref)

    def _same_encoder(self, ref: str) -> _EncoderState | None:
        """The loaded encoder under the new reference when `ref`'s bundle has the same weights
        and settings (fingerprint, pooling, max_length), else None; co-located heads are read
        from `ref`'s bundle either way."""
        from dataclasses import replace

        from polytask.model.manifest import read_manifest

        path = local_bundle(ref)
        manifest = read_manifest(path)
        same = (manifest.fingerprint, manifest.pooling, manifest.max_length) == (
            self.state.fingerprint,
            self.state.pooling,
            self.state.max_length,
        )
        if not same:
            return None
        heads = ColocatedHeads.load(path, self.colocated, manifest.fingerprint)
        return replace(self.state, ref=ref, heads=heads)

    def fingerprint(self) -> str:
        return self.state.fingerprint

    def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`: forwards failing in a row with no bad
        input to blame, or one hung forward, fail the replica and Serve starts a new one."""
        self.metrics.failures.set(self.health.failures)
        self.health.check()
        self.head_watch.check()

    def stats(self) -> dict[str, Any]:
        """`calls`: encode calls; `batches`/`batch_sizes`: inputs per gathered batch of calls."""
        batches = self.batcher.stats.as_dict()
        return {
            "calls": self.calls,
            "inputs": self.inputs,
            "batches": batches["batches"],
            "largest_batch": batches["largest_batch"],
            "batch_sizes": batches["batch_sizes"],
            "pass_sizes": list(self.passes[-100:]),
            "pass_overhead_tokens": self.state.pass_overhead,
            "fingerprint": self.state.fingerprint,
            "model": self.state.ref,
            "failures_in_a_row": self.health.failures,
            "pid": os.getpid(),
            "loads": self.loads,
            "colocated_calls": dict(self.head_watch.calls),
            **replica_identity(),
        }

    async def encode(
        self,
        texts: list[str],
        pairs: list[str] | None,
        need_pooled: bool | list[bool],
        need_tokens: bool | list[bool],
        heads: dict[str, list[int] | None] | None = None,
        keep_items: bool = True,
    ) -> dict[str, Any]:
        """Inputs → {fingerprint, model, items, answers}; item i holds only what input i's heads
        need (`need_*` per input, or one flag for all). `heads` runs co-located heads on the
        inputs each wants (None: all): `answers` is {task: answers, or the head's exception};
        `keep_items=False` returns no items (no separate head needs them)."""
        n = len(texts)
        pooled = need_pooled if isinstance(need_pooled, list) else [need_pooled] * n
        tokens = need_tokens if isinstance(need_tokens, list) else [need_tokens] * n
        if not (len(pooled) == len(tokens) == n and (pairs is None or len(pairs) == n)):
            raise ValueError("encode: pairs and need_* flags must have one entry per text")
        self.calls += 1
        self.inputs += n
        items = [
            _Item(t, pairs[i] if pairs is not None else None, pooled[i], tokens[i])
            for i, t in enumerate(texts)
        ]
        state, encoded = await self.batcher.submit(_EncodeCall(items))
        answers = {}
        if heads:
            answers = await asyncio.to_thread(
                self.head_watch.run, state.heads, heads, encoded, texts
            )
        return {
            "fingerprint": state.fingerprint,
            "model": state.ref,
            "items": encoded if keep_items else None,
            "answers": answers,
        }

    async def _encode_calls(self, calls: list[_EncodeCall]) -> list[tuple[_EncoderState, list[Any]]]:
        """All calls of a batch with one model version, in one worker thread."""
        state = self.state
        items = [item for call in calls for item in call.items]
        passes: _Passes = []
        try:
            encoded = await asyncio.to_thread(self._watched_forward, state, items, passes)
        finally:
            for sizes, seconds in passes:
                for size in sizes:
                    self.metrics.passes.observe(size)
                self.metrics.stages(seconds)
        out, start = [], 0
        for call in calls:
            out.append((state, encoded[start : start + len(call.items)]))
            start += len(call.items)
        return out

    def _watched_forward(
        self, state: _EncoderState, items: list[_Item], passes: _Passes
    ) -> list[Any]:
        with self.health.watch(not_ours=(InputRejected,)):
            return self._forward(state, items, passes)

    def _forward(
        self, state: _EncoderState, items: list[_Item], passes: _Passes
    ) -> list[Any]:
        """Singles and pairs apart, each tokenized once and forwarded in passes `plan_passes`
        cuts (padding weighed against the pass cost this replica measured); `passes` gets each
        view's pass sizes and stage seconds (recorded by the caller, on the replica's event loop)."""
        from polytask.model.inference import encode_batch

        results: list[Any] = [None] * len(items)
        for pair_view, idx in views_of([it.pair for it in items]):
            seconds: dict[str, float] = {}
            sizes: list[int] = []
            try:
                encoded = encode_batch(
                    state.encoder,
                    state.tokenizer,
                    [items[i].text for i in idx],
                    [items[i].pair or "" for i in idx] if pair_view else None,
                    max_length=state.max_length,
                    pooling=state.pooling,
                    need_pooled=any(items[i].need_pooled for i in idx),
                    need_tokens=any(items[i].need_tokens for i in idx),
                    device=self.device,
                    max_pass_inputs=self.max_batch_size,
                    overhead_tokens=state.pass_overhead,
                    timings=seconds,
                    pass_sizes=sizes,
                )
            except Exception:
                _blame_input(state, items, idx)
                raise
            self.passes = (self.passes + sizes)[-1000:]
            passes.append((sizes, seconds))
            for i, enc in zip(idx, encoded):
                if not items[i].need_pooled:
                    enc.pooled = None
                if not items[i].need_tokens:
                    enc.tokens = enc.word_ids = enc.word_spans = None
                results[i] = enc
        return results


def _blame_input(state: _EncoderState, items: list[_Item], chunk: list[int]) -> None:
    """After a failed pass: InputRejected for the first input the tokenizer refuses on its own;
    nothing when every input tokenizes (the replica, not an input, is at fault)."""
    for i in chunk:
        try:
            state.tokenizer(items[i].text, items[i].pair, truncation=True, max_length=state.max_length)
        except Exception as exc:
            raise InputRejected(
                i, f"the tokenizer cannot encode it ({type(exc).__name__}); send plain text"
            ) from exc
