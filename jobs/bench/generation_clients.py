"""HTTP clients of the generation serving benchmark: streaming decoders (time to first token,
time per output token), classification latency, and clients that hang up.

Each client is an asyncio task on one httpx connection pool, closed-loop: it sends its next
request when the previous one ends. Output lengths come from `lengths(i)` (a seeded draw per
request), and each request asks exactly that many tokens (min_new_tokens = max_new_tokens): an
untrained decoder rarely says EOS, so the drawn length is the answer's length on every path.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any


def draw_lengths(n: int, median: float, sigma: float, low: int, high: int, seed: int = 0) -> list[int]:
    """`n` output lengths from a log-normal (answers and summaries: most short, a long tail),
    clipped to [low, high]."""
    rng = random.Random(seed)
    return [min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def _stream_once(client: Any, path: str, text: str, length: int) -> dict[str, Any]:
    """One streamed decode: when it was sent, its first and last token, and how many tokens."""
    body = {"input": text, "max_new_tokens": length, "min_new_tokens": length}
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"{response.status_code}"}
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "token":
                last = time.perf_counter()
                first = first or last
                tokens += 1
            elif line.startswith("data: ") and event == "error":
                return {"error": json.loads(line[6:])["error"]["code"]}
    if first is None:
        return {"error": "no tokens"}
    return {"sent": sent, "first": first, "last": last, "tokens": tokens}


async def stream_level(
    base: str, task: str, texts: list[str], lengths: list[int], concurrency: int, duration_s: float,
    max_requests: int,
) -> dict[str, Any]:
    """`concurrency` clients stream decodes for `duration_s` (requests in flight then finish):
    tokens/s over the level's wall time, time to first token and per output token (p50/p95)."""
    import httpx

    path = f"/v1/tasks/{task}/generate/stream"
    records: list[dict[str, Any]] = []
    counter = iter(range(max_requests))
    began = time.perf_counter()
    stop_at = began + duration_s

    async def client(client_http: Any) -> None:
        while time.perf_counter() < stop_at:
            i = next(counter, None)
            if i is None:
                return
            records.append(await _stream_once(client_http, path, texts[i % len(texts)], lengths[i % len(lengths)]))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - began
    good = [r for r in records if "error" not in r]
    ttft = [r["first"] - r["sent"] for r in good]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in good if r["tokens"] > 1]
    ms = lambda values, q: None if pct(values, q) is None else 1000 * pct(values, q)
    return {
        "concurrency": concurrency,
        "requests": len(good),
        "errors": len(records) - len(good),
        "tokens": sum(r["tokens"] for r in good),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in good) / wall,
        "ttft_ms": {"p50": ms(ttft, 0.5), "p95": ms(ttft, 0.95)},
        "tpot_ms": {"p50": ms(tpot, 0.5), "p95": ms(tpot, 0.95)},
    }


async def predict_latencies(
    base: str, path: str, bodies: Callable[[int], dict[str, Any]], concurrency: int, duration_s: float
) -> dict[str, Any]:
    """Closed-loop clients on a predict route for `duration_s`: latency p50/p95 (ms), errors."""
    import httpx

    took: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s
    counter = iter(range(10**9))

    async def client(http: Any) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            r = await http.post(path, json=bodies(next(counter)))
            if r.status_code == 200:
                took.append(time.perf_counter() - sent)
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return {
        "requests": len(took),
        "errors": errors,
        "p50_ms": None if not took else 1000 * pct(took, 0.5),
        "p95_ms": None if not took else 1000 * pct(took, 0.95),
    }


async def beside_decoders(
    base: str, classify: Callable[[], Any], task: str, texts: list[str], clients: int, length: int
) -> Any:
    """`classify()` (a coroutine) run while `clients` other clients stream `length`-token decodes."""
    stop = asyncio.Event()

    async def decoder(http: Any, k: int) -> None:
        i = k
        while not stop.is_set():
            await _stream_once(http, f"/v1/tasks/{task}/generate/stream", texts[i % len(texts)], length)
            i += clients

    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        running = [asyncio.ensure_future(decoder(http, k)) for k in range(clients)]
        await asyncio.sleep(1.0)  # the decoders are decoding
        try:
            return await classify()
        finally:
            stop.set()
            for job in running:
                job.cancel()
            await asyncio.gather(*running, return_exceptions=True)


async def after_abandoned(
    base: str, task: str, texts: list[str], clients: int, length: int, hang_up_s: float, short: int
) -> dict[str, Any]:
    """`clients` ask `length`-token decodes on the predict route and hang up after `hang_up_s`;
    then one `short`-token request: its latency, and the Decoder's rows still in flight."""
    import httpx

    path = f"/v1/tasks/{task}/predict"
    body = lambda i, n: {"inputs": [texts[i % len(texts)]], "max_new_tokens": n, "min_new_tokens": n}

    async def hang_up(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=hang_up_s) as http:
            try:
                await http.post(path, json=body(i, length))
            except httpx.TimeoutException:
                pass

    await asyncio.gather(*(hang_up(i) for i in range(clients)))
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        sent = time.perf_counter()
        r = await http.post(path, json=body(clients, short))
        took = time.perf_counter() - sent
    return {"clients": clients, "length": length, "hang_up_s": hang_up_s, "short": short,
            "status": r.status_code, "short_ms": 1000 * took}
