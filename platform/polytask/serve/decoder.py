"""The Decoder deployment: a generation task's head, bound as `head_<task>` like every head.

`decode: continuous` (the default): each input is a row of the replica's step loop
(`serve.decode_loop`): it joins the rows decoding at the next step and leaves as soon as it ends,
so a short answer never waits for a long one; a call that is cancelled (its client went away,
its deadline passed) stops its rows at the next step. Beam search decodes per request on its own
thread, stoppable the same way.

`decode: static` (the previous path, kept as the benchmark's baseline): the calls that arrive
while a decode runs are decoded together in the next one, every row until the longest ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from polytask.serve.batching import MicroBatcher
from polytask.serve.decode_continuous import ContinuousDecoding, per_input
from polytask.serve.head import Head

# Inputs one decode carries at most; more wait for the next one.
DECODE_BATCH_INPUTS = 64


@dataclass
class _Stream:
    """One streamed input: the decode thread hands its tokens to the replica's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0  # tokens handed over; a decode run again (batch-mate failed) skips as many
    cancelled: bool = False


@dataclass
class _DecodeJob:
    """One call: its inputs' encoder states, and each input's longest and shortest answer."""

    items: list[Any]  # polytask.model.inference.Encoded, with tokens
    fingerprint: str
    model: str
    caps: list[int]
    mins: list[int]
    stream: _Stream | None = None


@serve.deployment
class Decoder(ContinuousDecoding, Head.func_or_class):  # type: ignore[misc, name-defined]
    """A generation head on CPU or GPU: `predict` as every head (one call per Ingress batch),
    plus `stream` (a generator: one event per token). Loads only `heads/<task>/`.
    `decoding`: generation_head_options' decode, max_rows, max_cached_tokens and threads."""

    def __init__(
        self,
        model: str,
        task: str,
        device: str = "cpu",
        wait_s: float = 0.05,
        decoding: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, task, device)
        self.start_loop(decoding or {})
        self.decoding = 0  # inputs in the decode running now
        self.tokens = 0
        self.steps = 0
        self.streams = {"open": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self.batcher: MicroBatcher[_DecodeJob, list[dict[str, Any]]] = MicroBatcher(
            self._decode_jobs,
            size=lambda job: len(job.items),
            max_size=DECODE_BATCH_INPUTS,
            follow_s=wait_s,
            on_batch=lambda size, waits: self.metrics.batch_formed("decoder", size, waits),
        )

    def _job(
        self,
        encoded: dict[str, Any],
        items: list[Any],
        max_new_tokens: int | list[int] | None,
        min_new_tokens: int | list[int] | None,
        stream: _Stream | None = None,
    ) -> _DecodeJob:
        _, spec = next(reversed(self.versions.values()))
        caps = per_input(max_new_tokens, len(items), spec.generation.max_new_tokens)
        mins = per_input(min_new_tokens, len(items), 0)
        return _DecodeJob(items, encoded["fingerprint"], encoded["model"], caps, mins, stream)

    async def predict(
        self,
        encoded: dict[str, Any],
        texts: list[str],
        indices: list[int] | None = None,
        max_new_tokens: int | list[int] | None = None,
        min_new_tokens: int | list[int] | None = None,
        sampling: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """{"answers": [{"text"}], ...} for the picked inputs; lengths: one, or one per input.
        `sampling`: {temperature, top_p, seed} (continuous decoding; none: greedy);
        `timeout_s`: the rows leave when it has passed."""
        if self.loop is not None:
            return await self.predict_rows(
                encoded, texts, indices, max_new_tokens, min_new_tokens, sampling, timeout_s
            )
        self.calls += 1
        self.inputs += len(texts)
        began = time.perf_counter()
        items = encoded["items"] if indices is None else [encoded["items"][i] for i in indices]
        job = self._job(encoded, items, max_new_tokens, min_new_tokens)
        answers = await self.batcher.submit(job)
        self.metrics.stage.observe(time.perf_counter() - began, {"stage": "head"})
        return {"answers": answers, "fingerprint": job.fingerprint, "model": job.model}

    async def stream(
        self,
        encoded: dict[str, Any],
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        sampling: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Call with `handle.options(stream=True)`: {"id", "text"} (the text so far) per new token,
        then {"answer", "tokens", "fingerprint", "model"}. Cancelling the call (the client went
        away) ends this input's decode at the next step."""
        if self.loop is not None:
            from contextlib import aclosing

            # closing this stream closes the row's at once (its row leaves at the next step)
            rows = self.stream_row(encoded, max_new_tokens, min_new_tokens, sampling, timeout_s)
            async with aclosing(rows) as events:
                async for event in events:
                    yield event
            return
        stream = _Stream(asyncio.get_running_loop())
        job = self._job(encoded, encoded["items"][:1], max_new_tokens, min_new_tokens, stream)
        self.calls += 1
        self.inputs += 1
        self.streams["open"] += 1
        outcome = "failed"
        result = asyncio.ensure_future(self.batcher.submit(job))
        token: asyncio.Future | None = None
        ids: list[int] = []
        try:
            while True:
                token = asyncio.ensure_future(stream.queue.get())
                await asyncio.wait({token, result}, return_when=asyncio.FIRST_COMPLETED)
                if not token.done():
                    break
                ids.append(token.result())
                yield {"id": ids[-1], "text": self._text(job, ids)}
            while not stream.queue.empty():
                ids.append(stream.queue.get_nowait())
                yield {"id": ids[-1], "text": self._text(job, ids)}
            (answer,) = result.result()
            outcome = "completed"
            yield {
                "answer": answer,
                "tokens": len(ids),
                "fingerprint": job.fingerprint,
                "model": job.model,
            }
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            stream.cancelled = True
            result.cancel()
            if token is not None:
                token.cancel()
            self.streams["open"] -= 1
            self.streams[outcome] += 1
            self.metrics.streams.inc(1, {"task": self.task, "outcome": outcome})

    def _text(self, job: _DecodeJob, ids: list[int]) -> str:
        head, _ = self.versions[job.fingerprint]
        return head.tokenizer.decode(ids, skip_special_tokens=True)

    async def _decode_jobs(self, jobs: list[_DecodeJob]) -> list[list[dict[str, Any]]]:
        from polytask.model.manifest import BundleError

        rows = sum(len(job.items) for job in jobs)
        self.decoding += rows
        began = time.perf_counter()
        tokens_before = self.tokens
        try:
            with self.health.watch(not_ours=(BundleError,)):
                return await asyncio.to_thread(self._decode, jobs)
        finally:
            self.decoding -= rows
            seconds = time.perf_counter() - began
            self.metrics.decoded(self.task, seconds, self.tokens - tokens_before)

    def _decode(self, jobs: list[_DecodeJob]) -> list[list[dict[str, Any]]]:
        """Every job's answers: one decode per encoder fingerprint (two only mid-update)."""
        out: list[list[dict[str, Any]]] = [[] for _ in jobs]
        by_fingerprint: dict[str, list[int]] = {}
        for j, job in enumerate(jobs):
            by_fingerprint.setdefault(job.fingerprint, []).append(j)
        for fingerprint, picked in by_fingerprint.items():
            found = self.versions.get(fingerprint)
            head, spec = found or self._load(jobs[picked[0]].model, fingerprint)
            answers = iter(self._generate(head, spec, [jobs[j] for j in picked]))
            for j in picked:
                out[j] = [next(answers) for _ in jobs[j].items]
        return out

    def _generate(self, head: Any, spec: Any, jobs: list[_DecodeJob]) -> list[dict[str, Any]]:
        from polytask.model.inference import generate_answers

        owner = [job for job in jobs for _ in job.items]  # the job of each row
        handed = [0] * len(owner)  # tokens of each row handed to its stream in this decode
        skip = {head.eos_id, head.pad_id}

        def on_step(step: int, new: list[int | None], finished: list[bool]) -> bool | set[int]:
            self.steps += 1
            ended, live = set(), False
            for row, token in enumerate(new):
                stream = owner[row].stream
                if stream is not None and stream.cancelled:
                    ended.add(row)
                    continue
                live = live or not finished[row]
                if token is None or token in skip:
                    continue
                self.tokens += 1
                handed[row] += 1
                if stream is not None and handed[row] > stream.sent:
                    stream.sent += 1
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, token)
            return live and ended

        greedy = spec.generation.num_beams == 1
        return generate_answers(
            head,
            spec,
            [item for job in jobs for item in job.items],
            on_step=on_step if greedy else None,
            max_new_tokens=[cap for job in jobs for cap in job.caps],
            min_new_tokens=[least for job in jobs for least in job.mins],
        )

    def stats(self) -> dict[str, Any]:
        """Head stats plus decoding: `in_flight` inputs decoding (or waiting to), `tokens` and
        `steps` decoded, `streams` by outcome; static: `batch_sizes` (inputs per decode);
        continuous: `loop` (the step loop's counters and per-step time breakdown)."""
        if self.loop is not None:
            return {**super().stats(), **self.loop_stats()}
        return {
            **super().stats(),
            **self.batcher.stats.as_dict(),
            "in_flight": self.decoding,
            "tokens": self.tokens,
            "steps": self.steps,
            "streams": dict(self.streams),
        }
