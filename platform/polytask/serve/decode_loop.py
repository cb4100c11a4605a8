"""The step loop of a generation head replica: one thread owns the rows decoding now.

Every iteration, rows waiting join (within the replica's limits on rows and cached tokens),
every row advances one token, and rows that ended, hit their cap, were cancelled or passed their
deadline leave (`model.decoding.StepBatch`). Tokens go back to asyncio waiters through
`loop.call_soon_threadsafe`, so the replica's event loop never blocks on a decode, and a
cancelled call's rows stop at the next step (an `asyncio.to_thread` decode cannot be stopped).
Beam search keeps a per-request path (transformers' `generate`) on its own thread, stoppable
through a stopping criterion that reads the same cancel flag.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from polytask.model.decoding import Row, StepBatch

# Defaults of generation_head_options (serve config): rows decoding at once per replica, and
# tokens their caches may hold together (each row reserves its encoder input + its cap).
MAX_ROWS = 64
MAX_CACHED_TOKENS = 65_536


@dataclass
class LoopStats:
    """What the loop did, for `stats()` and the benchmark's per-step CPU breakdown."""

    steps: int = 0
    tokens: int = 0
    admitted: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    step_s: float = 0.0  # wall time in iterations (admission + step)
    busy_rows: int = 0  # sum over steps of rows stepped (useful row-steps)
    retired: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # dropped batches' times

    def as_dict(self, batches: list[StepBatch]) -> dict[str, Any]:
        forward = sum(b.forward_s for b in batches) + self.retired[0]
        pick = sum(b.pick_s for b in batches) + self.retired[1]
        book = sum(b.book_s for b in batches) + self.retired[2]
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "admitted": self.admitted,
            "ended": dict(self.ended),
            "rows_per_step": self.busy_rows / self.steps if self.steps else 0.0,
            "step_ms": 1000 * self.step_s / self.steps if self.steps else 0.0,
            "breakdown_s": {"forward": forward, "pick": pick, "bookkeeping": book, "total": self.step_s},
        }


class DecodeLoop:
    """A replica's decode thread. `submit(head, row)` queues a row; the thread admits it when
    the limits allow, steps it with the other rows of the same head version, and calls its
    `on_token`/`on_done` (from the thread: wrap them with `call_soon_threadsafe`)."""

    def __init__(
        self,
        max_rows: int = MAX_ROWS,
        max_cached_tokens: int = MAX_CACHED_TOKENS,
        threads: int | None = None,
        name: str = "decode",
    ) -> None:
        self.max_rows = max_rows
        self.max_cached_tokens = max_cached_tokens
        self.threads = threads
        self.waiting: deque[tuple[Any, Row]] = deque()
        self.batches: dict[int, StepBatch] = {}
        self.wake = threading.Condition()
        self.stats = LoopStats()
        self.active = 0  # rows in the batches, as of the last iteration (read from other threads)
        self.stopped = False
        self.beams = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-beam")
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, head: Any, row: Row) -> None:
        with self.wake:
            self.waiting.append((head, row))
            self.wake.notify()

    @property
    def in_flight(self) -> int:
        """Rows decoding or waiting to."""
        return self.active + len(self.waiting)

    def snapshot(self) -> dict[str, Any]:
        with self.wake:  # the loop thread adds and drops batches under this lock
            batches = list(self.batches.values())
        return {
            **self.stats.as_dict(batches),
            "in_flight": self.in_flight,
            "waiting": len(self.waiting),
            "max_rows": self.max_rows,
            "max_cached_tokens": self.max_cached_tokens,
            "threads": self.threads,
        }

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.beams.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.wake:
                while not self.stopped and not self.waiting and not any(self.batches.values()):
                    self.wake.wait()
                if self.stopped:
                    return
                self._purge()
                joining = self._admissible()
            began = time.perf_counter()
            for head, rows in joining.items():
                self._admit(head, rows)
            for key, batch in list(self.batches.items()):
                if len(batch):
                    self.stats.busy_rows += len(batch)
                    self._guarded(batch, batch.step)
                if not len(batch):
                    self._retire(key)
            self.active = sum(len(b) for b in self.batches.values())
            self.stats.steps += 1
            self.stats.step_s += time.perf_counter() - began

    def _purge(self) -> None:
        """Waiting rows whose caller is gone leave now, not when their turn comes."""
        now = time.monotonic()
        kept: deque[tuple[Any, Row]] = deque()
        for head, row in self.waiting:
            reason = row.gone(now)
            if reason is None:
                kept.append((head, row))
            else:
                self._end(row, reason)
        self.waiting = kept

    def _admissible(self) -> dict[Any, list[Row]]:
        """Waiting rows that fit the limits, oldest first (a cancelled one leaves here). A row
        larger than the token limit alone still goes when nothing else decodes."""
        rows = sum(len(b) for b in self.batches.values())
        tokens = sum(b.cached_tokens for b in self.batches.values())
        now = time.monotonic()
        out: dict[Any, list[Row]] = {}
        while self.waiting and rows < self.max_rows:
            head, row = self.waiting[0]
            reason = row.gone(now)
            if reason is not None:
                self.waiting.popleft()
                self._end(row, reason)
                continue
            if tokens + row.reserve > self.max_cached_tokens and rows > 0:
                break
            self.waiting.popleft()
            out.setdefault(head, []).append(row)
            rows += 1
            tokens += row.reserve
        return out

    def _admit(self, head: Any, rows: list[Row]) -> None:
        batch = self.batches.get(id(head))
        if batch is None:
            with self.wake:
                batch = self.batches[id(head)] = StepBatch(head)
        self.stats.admitted += len(rows)
        try:
            self._report(batch.admit(rows))
        except Exception as exc:  # noqa: BLE001 - a bad input fails alone: retry one by one
            if len(rows) == 1:
                rows[0].error = exc
                self._end(rows[0], "failed")
                return
            for row in rows:
                self._admit(head, [row])

    def _guarded(self, batch: StepBatch, step: Callable[[], Any]) -> None:
        try:
            self._report(step())
        except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, not the loop
            for row in batch.rows:
                row.error = exc
                self._end(row, "failed")
            batch._keep([])

    def _report(self, events: list[tuple[Row, int | None, str | None]]) -> None:
        for row, token, ended in events:
            if token is not None:
                self.stats.tokens += 1
                if row.on_token is not None:
                    row.on_token(token)
            if ended is not None:
                self._end(row, ended)

    def _end(self, row: Row, reason: str) -> None:
        self.stats.ended[reason] = self.stats.ended.get(reason, 0) + 1
        if row.on_done is not None:
            row.on_done(list(row.ids), reason)

    def _retire(self, key: int) -> None:
        """An empty batch of a head version no longer served is dropped (its timings kept)."""
        with self.wake:
            batch = self.batches.pop(key)
        batch.close()
        for i, value in enumerate((batch.forward_s, batch.pick_s, batch.book_s)):
            self.stats.retired[i] += value


class Waiter:
    """The asyncio side of one row: tokens and the end arrive through `call_soon_threadsafe`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.loop = loop
        self.done: asyncio.Future[tuple[list[int], str]] = loop.create_future()
        self.tokens: asyncio.Queue[int] | None = asyncio.Queue() if stream else None

    def on_token(self, token: int) -> None:
        if self.tokens is not None:
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, token)

    def on_done(self, ids: list[int], reason: str) -> None:
        self.loop.call_soon_threadsafe(self._finish, ids, reason)

    def _finish(self, ids: list[int], reason: str) -> None:
        if not self.done.done():
            self.done.set_result((ids, reason))
