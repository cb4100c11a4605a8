"""The Ingress/Encoder micro-batcher on its own (no Ray): who waits, what goes together, and how
one bad job is kept from failing its batch-mates. Serve end to end is in test_serve.py."""

from __future__ import annotations

import asyncio

import pytest

from polytask.serve.batching import MicroBatcher


class Recorder:
    """A batch function that remembers its batches and fails every batch holding a 'bad' job."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s

    async def __call__(self, jobs: list[str]) -> list[str]:
        self.batches.append(list(jobs))
        await asyncio.sleep(self.delay_s)
        if any(job.startswith("bad") for job in jobs):
            raise ValueError(f"cannot handle {[j for j in jobs if j.startswith('bad')]}")
        return [job.upper() for job in jobs]


def test_a_lone_job_leaves_at_once_and_jobs_arriving_meanwhile_go_together():
    async def scenario() -> tuple[Recorder, list[str], float]:
        rec = Recorder(delay_s=0.05)
        batcher = MicroBatcher(rec, max_in_flight=1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = await batcher.submit("a")
        lone = loop.time() - start
        results = await asyncio.gather(*(batcher.submit(x) for x in "bcdef"))
        return rec, [first, *results], lone

    rec, results, lone = asyncio.run(scenario())
    assert results == list("ABCDEF")
    assert lone < 0.2
    # b starts a batch alone (nothing was running); c..f arrive while it runs and go together
    assert rec.batches == [["a"], ["b"], ["c", "d", "e", "f"]]


def test_max_size_counts_inputs_and_a_large_job_goes_alone():
    async def scenario() -> Recorder:
        rec = Recorder()
        batcher = MicroBatcher(rec, size=len, max_size=4, max_in_flight=1)
        await asyncio.gather(*(batcher.submit(x) for x in ["aa", "bb", "cc", "dddddd", "e"]))
        return rec

    assert asyncio.run(scenario()).batches == [["aa"], ["bb", "cc"], ["dddddd"], ["e"]]


def test_in_flight_limit_and_wait():
    async def scenario() -> tuple[Recorder, Recorder]:
        two = Recorder()
        batcher = MicroBatcher(two, max_in_flight=2)
        await asyncio.gather(*(batcher.submit(x) for x in "abcd"))
        waited = Recorder(delay_s=0.1)
        patient = MicroBatcher(waited, max_in_flight=2, wait_s=0.05)

        async def later(job: str, delay_s: float) -> str:
            await asyncio.sleep(delay_s)
            return await patient.submit(job)

        await asyncio.gather(patient.submit("x"), later("y", 0.01), later("z", 0.03))
        return two, waited

    two, waited = asyncio.run(scenario())
    assert two.batches == [["a"], ["b"], ["c", "d"]]
    # x runs alone at once (nothing was running); y arrives while x runs, so its batch waits
    # wait_s and takes z along
    assert waited.batches == [["x"], ["y", "z"]]


def test_a_failing_job_fails_alone_and_its_batch_mates_are_answered():
    async def scenario() -> tuple[Recorder, list[object], MicroBatcher]:
        rec = Recorder()
        batcher = MicroBatcher(rec, max_in_flight=1)
        outcomes = await asyncio.gather(
            *(batcher.submit(x) for x in ["first", "ok1", "bad1", "ok2", "bad2"]),
            return_exceptions=True,
        )
        return rec, outcomes, batcher

    rec, outcomes, batcher = asyncio.run(scenario())
    assert outcomes[0] == "FIRST" and outcomes[1] == "OK1" and outcomes[3] == "OK2"
    assert isinstance(outcomes[2], ValueError) and "bad1" in str(outcomes[2])
    assert isinstance(outcomes[4], ValueError) and "bad2" in str(outcomes[4])
    assert "bad1" not in str(outcomes[4]), "each failing job gets its own error"
    assert ["ok1", "bad1", "ok2", "bad2"] in rec.batches  # tried together first
    assert ["ok1", "bad1"] in rec.batches and ["ok2", "bad2"] in rec.batches  # then by halves
    assert ["ok1"] in rec.batches and ["bad2"] in rec.batches  # down to one job
    assert batcher.stats.split_batches == 3
    assert batcher.stats.jobs == 5 and batcher.stats.batches == 2
    assert batcher.stats.calls == 1 + 1 + 2 + 4  # first, the batch, its halves, their halves


def test_one_bad_job_among_many_costs_a_few_calls_not_one_per_job():
    """A failed batch is split in halves, so its good halves answer at once: one bad job in 16
    costs 1 + 2·log2(16) = 9 calls, not 1 + 16."""

    async def scenario() -> tuple[Recorder, list[object], MicroBatcher]:
        rec = Recorder(delay_s=0.05)
        batcher = MicroBatcher(rec, max_in_flight=1)
        jobs = ["first"] + [f"ok{i}" for i in range(15)] + ["bad"]
        outcomes = await asyncio.gather(*(batcher.submit(j) for j in jobs), return_exceptions=True)
        return rec, outcomes, batcher

    rec, outcomes, batcher = asyncio.run(scenario())
    assert isinstance(outcomes[-1], ValueError)
    assert outcomes[1:-1] == [f"OK{i}" for i in range(15)]
    assert batcher.stats.calls == len(rec.batches) == 1 + 1 + 2 * 4


def test_never_split_errors_fail_the_batch_without_retries():
    class Overloaded(Exception):
        pass

    async def scenario() -> tuple[list[object], int]:
        calls = 0

        async def run(jobs: list[str]) -> list[str]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            raise Overloaded("busy")

        batcher = MicroBatcher(run, max_in_flight=1, never_split=(Overloaded,))
        outcomes = await asyncio.gather(*(batcher.submit(x) for x in "abc"), return_exceptions=True)
        return outcomes, calls

    outcomes, calls = asyncio.run(scenario())
    assert all(isinstance(o, Overloaded) for o in outcomes)
    assert calls == 2  # ["a"], then ["b", "c"]: no job was retried alone


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_in_flight"):
        MicroBatcher(Recorder(), max_in_flight=0)


def test_on_batch_hears_each_batch_size_and_how_long_its_jobs_waited():
    """What feeds the replica's metrics: one call per batch that leaves, with its inputs and the
    queue wait of each job (the ones that waited behind a running batch waited for it)."""

    async def scenario() -> list[tuple[int, list[float]]]:
        heard: list[tuple[int, list[float]]] = []
        batcher = MicroBatcher(
            Recorder(delay_s=0.05),
            size=len,
            max_in_flight=1,
            on_batch=lambda size, waits: heard.append((size, waits)),
        )
        await asyncio.gather(*(batcher.submit(x) for x in ("ab", "c", "de")))
        return heard

    heard = asyncio.run(scenario())
    assert [size for size, _ in heard] == [2, 3]
    (first,), second = heard[0][1], heard[1][1]
    assert first < 0.02
    assert len(second) == 2 and all(0.04 < w < 0.5 for w in second)


def test_follow_lets_the_callers_just_answered_join_the_next_batch():
    """x runs; y waits for it. When x ends, y's batch waits follow_s, so x's caller, sending
    again at once (x2), goes with y instead of after it. A job reaching an idle batcher leaves
    at once."""

    async def scenario() -> tuple[Recorder, float]:
        rec = Recorder(delay_s=0.05)
        batcher = MicroBatcher(rec, max_in_flight=1, follow_s=0.3)

        async def again(job: str, then: str) -> str:
            await batcher.submit(job)
            return await batcher.submit(then)

        async def later(job: str) -> str:
            await asyncio.sleep(0.01)
            return await batcher.submit(job)

        await asyncio.gather(again("x", "x2"), later("y"))
        await asyncio.sleep(0.35)  # idle for longer than follow_s
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit("z")
        return rec, loop.time() - start

    rec, lone = asyncio.run(scenario())
    assert rec.batches == [["x"], ["y", "x2"], ["z"]]
    assert lone < 0.25  # z ran (0.05 s) without waiting follow_s (0.3 s)
