"""Adaptive micro-batching for one replica: concurrent calls are gathered into one batch call.

A batch leaves as soon as fewer than `max_in_flight` batches are running, so a lone request
never waits; under load, everything that arrived while the previous batch ran goes in the next.
(Ray's `@serve.batch` forms its next batch before waiting for a free slot, so it either adds its
wait to every lone request or, with no wait, sends batches of one while the replica is busy.)

One failing job never fails its batch-mates: when a batch call raises, the batch is split in
halves and each half tried again, down to the guilty job(s), so one bad job among n costs about
2·log2(n) more calls, not n. Errors that no job causes (a dead replica, a timeout, back-pressure:
`never_split`) fail the whole batch at once, with no extra calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


@dataclass
class BatchStats:
    """What a batcher did: tests and the benchmark read these through the deployments' `stats()`."""

    jobs: int = 0
    batches: int = 0
    calls: int = 0  # run_batch calls: batches plus the halves of failed ones (downstream calls)
    largest: int = 0
    split_batches: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, size: int) -> None:
        self.batches += 1
        self.largest = max(self.largest, size)
        self.sizes.append(size)
        del self.sizes[:-1000]

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "batches": self.batches,
            "calls": self.calls,
            "largest_batch": self.largest,
            "split_batches": self.split_batches,
            "batch_sizes": list(self.sizes[-100:]),
        }


class MicroBatcher(Generic[J, R]):
    """`await submit(job)` → that job's result from `run_batch(jobs)` (one result per job).

    `size(job)` counts a job's inputs; a batch holds at most `max_size` of them (a larger job
    goes alone). `wait_s` > 0 lets a batch that is not full wait that long for more jobs, but
    only while another batch is running: a lone request still leaves at once.
    `follow_s` > 0: a batch that leaves right after the previous one ended waits that long for
    more jobs (a decoder whose batches run for seconds: the callers it just answered send again
    at once, and join this batch instead of waiting a whole batch for the next); a job reaching
    an idle batcher still leaves at once.
    Exceptions in `never_split` (e.g. back-pressure) fail the whole batch without a retry.
    `on_batch(size, waits_s)` hears of each batch as it leaves: its inputs and how long each of
    its jobs waited (the replica's metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[list[J]], Awaitable[list[R]]],
        *,
        size: Callable[[J], int] = lambda _: 1,
        max_size: int = 256,
        max_in_flight: int = 1,
        wait_s: float = 0.0,
        follow_s: float = 0.0,
        never_split: tuple[type[BaseException], ...] = (),
        on_batch: Callable[[int, list[float]], None] | None = None,
    ) -> None:
        if max_size < 1 or max_in_flight < 1 or wait_s < 0 or follow_s < 0:
            raise ValueError("max_size and max_in_flight must be >= 1, wait_s and follow_s >= 0")
        self.run_batch = run_batch
        self.size = size
        self.max_size = max_size
        self.max_in_flight = max_in_flight
        self.wait_s = wait_s
        self.follow_s = follow_s
        self._last_end = float("-inf")
        self.never_split = never_split
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._pending: deque[tuple[J, asyncio.Future]] = deque()
        self._since: dict[asyncio.Future, float] = {}  # submit time of each waiting job
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, job: J) -> R:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        self._since[future] = time.perf_counter()
        self.stats.jobs += 1
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(self._run(self._take([])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, batch: list[tuple[J, asyncio.Future]]) -> list[tuple[J, asyncio.Future]]:
        total = sum(self.size(job) for job, _ in batch)
        while self._pending:
            job, future = self._pending[0]
            if future.done():  # the caller went away (client disconnected)
                self._pending.popleft()
                self._since.pop(future, None)
                continue
            n = self.size(job)
            if batch and total + n > self.max_size:
                break
            batch.append(self._pending.popleft())
            total += n
        return batch

    async def _run(self, batch: list[tuple[J, asyncio.Future]]) -> None:
        try:
            busy = self._in_flight > 1  # another batch is running: more requests are coming
            following = time.perf_counter() - self._last_end < self.follow_s
            wait_s = self.follow_s if following else self.wait_s if busy else 0.0
            if wait_s > 0 and sum(self.size(j) for j, _ in batch) < self.max_size:
                await asyncio.sleep(wait_s)
                batch = self._take(batch)
            now = time.perf_counter()
            waits = [now - self._since.pop(future, now) for _, future in batch]
            live = [(job, future) for job, future in batch if not future.done()]
            if not live:
                return
            size = sum(self.size(job) for job, _ in live)
            self.stats.record(size)
            if self.on_batch is not None:
                self.on_batch(size, waits)
            outcomes = await self._outcomes([job for job, _ in live])
            for (_, future), outcome in zip(live, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        except BaseException as exc:  # cancelled replica shutdown: no caller may hang
            for _, future in batch:
                self._since.pop(future, None)
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            self._in_flight -= 1
            self._last_end = time.perf_counter()
            self._dispatch()

    async def _outcomes(self, jobs: list[J]) -> list[R | BaseException]:
        self.stats.calls += 1
        try:
            results = list(await self.run_batch(jobs))
        except self.never_split as exc:
            return [exc] * len(jobs)
        except Exception as exc:  # noqa: BLE001 - any failure: find the guilty job(s) by halves
            if len(jobs) == 1:
                return [exc]
            self.stats.split_batches += 1
            half = len(jobs) // 2
            first, second = await asyncio.gather(
                self._outcomes(jobs[:half]), self._outcomes(jobs[half:])
            )
            return first + second
        if len(results) != len(jobs):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} jobs")
        return results
