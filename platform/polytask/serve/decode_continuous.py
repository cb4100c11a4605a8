"""The Decoder's continuous path: each input a row of the replica's step loop.

A call's rows are queued to the loop thread and awaited on the replica's event loop; the call
returns when its own rows end, whatever else decodes. A cancelled call (the Ingress gave up at
its deadline, Serve cancelled it because the HTTP client went away, a stream was closed) marks
its rows cancelled, and they leave at the loop's next step.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from polytask.model.decoding import Row
from polytask.serve.decode_loop import MAX_CACHED_TOKENS, MAX_ROWS, DecodeLoop, Waiter


def per_input(value: int | list[int] | None, n: int, default: int) -> list[int]:
    """A length setting per input: one value for all, a list (one per input), or the default."""
    if value is None:
        return [default] * n
    return list(value) if isinstance(value, list) else [int(value)] * n


def default_threads() -> int:
    """Torch threads of one Decoder replica when the config sets none: half the machine's cores
    (at least one), so the Encoder keeps the other half while summaries decode."""
    return max(1, (os.cpu_count() or 2) // 2)


class ContinuousDecoding:
    """Mixed into the Decoder deployment (which provides versions, _load, metrics, health)."""

    loop: DecodeLoop | None = None

    def start_loop(self, decoding: dict[str, Any]) -> None:
        """Start the step loop unless `decoding["decode"]` is "static"."""
        self.stream_counts = {"open": 0, "completed": 0, "cancelled": 0, "failed": 0}
        if decoding.get("decode", "continuous") == "static":
            self.loop = None
            return
        self.loop = DecodeLoop(
            max_rows=int(decoding.get("max_rows") or MAX_ROWS),
            max_cached_tokens=int(decoding.get("max_cached_tokens") or MAX_CACHED_TOKENS),
            threads=int(decoding.get("threads") or default_threads()),
            name=f"decode-{self.task}",  # type: ignore[attr-defined]
        )

    async def _version(self, encoded: dict[str, Any]) -> tuple[Any, Any]:
        found = self.versions.get(encoded["fingerprint"])  # type: ignore[attr-defined]
        if found is not None:
            return found
        return await asyncio.to_thread(self._load, encoded["model"], encoded["fingerprint"])  # type: ignore[attr-defined]

    def _rows(
        self,
        head: Any,
        spec: Any,
        items: list[Any],
        caps: list[int],
        mins: list[int],
        sampling: dict[str, Any] | None,
        timeout_s: float | None,
        stream: bool,
    ) -> list[tuple[Row, Waiter]]:
        import torch

        loop = asyncio.get_running_loop()
        dtype = next(head.parameters()).dtype
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sampling = sampling or {}
        out = []
        for item, cap, least in zip(items, caps, mins):
            waiter = Waiter(loop, stream)
            row = Row(
                torch.from_numpy(item.tokens).to(dtype),
                cap,
                least,
                temperature=float(sampling.get("temperature") or 0.0),
                top_p=float(sampling.get("top_p") or 1.0),
                seed=sampling.get("seed"),
                no_repeat_ngram_size=spec.generation.no_repeat_ngram_size,
                deadline=deadline,
                on_token=waiter.on_token if stream else None,
                on_done=waiter.on_done,
            )
            out.append((row, waiter))
        return out

    def _answer(self, head: Any, spec: Any, row: Row, reason: str) -> dict[str, Any]:
        if reason == "failed":
            raise row.error or RuntimeError("the decode of this input failed")
        if reason == "deadline":
            raise TimeoutError("the request's deadline passed while its answer was decoding")
        return spec.task_kind.decode(head.tokenizer.decode(row.ids, skip_special_tokens=True), spec)

    async def predict_rows(
        self,
        encoded: dict[str, Any],
        texts: list[str],
        indices: list[int] | None,
        max_new_tokens: int | list[int] | None,
        min_new_tokens: int | list[int] | None,
        sampling: dict[str, Any] | None,
        timeout_s: float | None,
    ) -> dict[str, Any]:
        from polytask.model.manifest import BundleError

        assert self.loop is not None
        self.calls += 1  # type: ignore[attr-defined]
        self.inputs += len(texts)  # type: ignore[attr-defined]
        began = time.perf_counter()
        items = encoded["items"] if indices is None else [encoded["items"][i] for i in indices]
        # a bad bundle or a request's own deadline is not this replica's fault
        with self.health.watch(not_ours=(BundleError, TimeoutError)):  # type: ignore[attr-defined]
            head, spec = await self._version(encoded)
            caps = per_input(max_new_tokens, len(items), spec.generation.max_new_tokens)
            mins = per_input(min_new_tokens, len(items), 0)
            if spec.generation.num_beams > 1:
                answers = await self._beam(head, spec, items, caps, mins)
            else:
                rows = self._rows(head, spec, items, caps, mins, sampling, timeout_s, stream=False)
                for row, _ in rows:
                    self.loop.submit(head, row)
                try:
                    ended = await asyncio.gather(*(waiter.done for _, waiter in rows))
                except asyncio.CancelledError:
                    for row, _ in rows:
                        row.cancelled = True
                    raise
                answers = [self._answer(head, spec, row, why) for (row, _), (_, why) in zip(rows, ended)]
                tokens = sum(len(row.ids) for row, _ in rows)
        seconds = time.perf_counter() - began
        self.metrics.stage.observe(seconds, {"stage": "head"})  # type: ignore[attr-defined]
        self.metrics.decoded(self.task, seconds, tokens if spec.generation.num_beams == 1 else 0)  # type: ignore[attr-defined]
        return {"answers": answers, "fingerprint": encoded["fingerprint"], "model": encoded["model"]}

    async def _beam(self, head: Any, spec: Any, items: list[Any], caps: list[int], mins: list[int]) -> list[Any]:
        """Beam search on the loop's beam thread (transformers' `generate`); a cancelled call
        sets the flag its stopping criterion reads, so the search ends at its next step."""
        from polytask.model.inference import generate_answers

        assert self.loop is not None
        flag = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(
            self.loop.beams,
            lambda: generate_answers(head, spec, items, max_new_tokens=caps, min_new_tokens=mins, stop=flag.is_set),
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            flag.set()
            raise

    async def stream_row(
        self,
        encoded: dict[str, Any],
        max_new_tokens: int | None,
        min_new_tokens: int | None,
        sampling: dict[str, Any] | None,
        timeout_s: float | None,
    ) -> AsyncIterator[dict[str, Any]]:
        """One input's tokens as they are decoded, then its answer (see `Decoder.stream`)."""
        assert self.loop is not None
        head, spec = await self._version(encoded)
        cap = int(max_new_tokens or spec.generation.max_new_tokens)
        ((row, waiter),) = self._rows(
            head, spec, encoded["items"][:1], [cap], [int(min_new_tokens or 0)], sampling, timeout_s, stream=True
        )
        assert waiter.tokens is not None
        self.calls += 1  # type: ignore[attr-defined]
        self.inputs += 1  # type: ignore[attr-defined]
        self.stream_counts["open"] += 1
        outcome = "failed"
        self.loop.submit(head, row)
        ids: list[int] = []
        token: asyncio.Future | None = None
        try:
            while True:
                token = asyncio.ensure_future(waiter.tokens.get())
                await asyncio.wait({token, waiter.done}, return_when=asyncio.FIRST_COMPLETED)
                if not token.done():
                    break
                ids.append(token.result())
                yield {"id": ids[-1], "text": head.tokenizer.decode(ids, skip_special_tokens=True)}
            while not waiter.tokens.empty():
                ids.append(waiter.tokens.get_nowait())
                yield {"id": ids[-1], "text": head.tokenizer.decode(ids, skip_special_tokens=True)}
            answer = self._answer(head, spec, row, waiter.done.result()[1])
            outcome = "completed"
            yield {"answer": answer, "tokens": len(ids), "fingerprint": encoded["fingerprint"], "model": encoded["model"]}
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            row.cancelled = True
            if token is not None:
                token.cancel()
            self.stream_counts["open"] -= 1
            self.stream_counts[outcome] += 1
            self.metrics.streams.inc(1, {"task": self.task, "outcome": outcome})  # type: ignore[attr-defined]

    def loop_stats(self) -> dict[str, Any]:
        assert self.loop is not None
        snap = self.loop.snapshot()
        return {
            "in_flight": snap["in_flight"],
            "tokens": snap["tokens"],
            "steps": snap["steps"],
            "streams": dict(self.stream_counts),
            "loop": snap,
        }
