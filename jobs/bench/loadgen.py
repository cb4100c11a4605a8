"""Closed-loop HTTP load generator, run in its own process so it never shares a GIL with Ray.

Standard library only (asyncio streams, hand-written HTTP/1.1 with keep-alive): a request costs
the client a few tens of microseconds, and `ceiling()` measures what it can drive at all against
a trivial server in another process, so a result near that ceiling says "client-bound".

    python jobs/bench/loadgen.py SPEC.json     # prints one JSON result line
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


class HTTPError(RuntimeError):
    """A non-200 answer or a malformed body; counted as an error, never raised out of a level."""


class Shed(HTTPError):
    """A 503 the server answered at once to shed load; counted apart from errors."""


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.retry_after: str | None = None  # the last answer's Retry-After header

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        try:
            status_line = await self.reader.readline()
            if not status_line:
                raise HTTPError("connection closed by the server")
            status = int(status_line.split()[1])
            length, close, chunked = 0, False, False
            self.retry_after = None
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                value = value.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding" and "chunked" in value:
                    chunked = True
                elif name == "connection" and value == "close":
                    close = True
                elif name == "retry-after":
                    self.retry_after = value
            payload = await (self._chunks() if chunked else self.reader.readexactly(length))
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, payload

    async def _chunks(self) -> bytes:
        """A `Transfer-Encoding: chunked` body."""
        parts = []
        while True:
            size = int((await self.reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readline()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def percentiles(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    ms = sorted(x * 1000.0 for x in latencies_s)

    def pct(q: float) -> float:
        pos = (len(ms) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    return {
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "mean": sum(ms) / len(ms),
        "max": ms[-1],
    }


async def run_load(
    send: Callable[[list[str]], Awaitable[None]],
    texts: list[str],
    concurrency: int,
    inputs_per_request: int,
    duration_s: float,
    max_requests: int,
    warmup_requests: int = 0,
) -> dict[str, Any]:
    """`concurrency` workers each send one request at a time until `duration_s` has passed or
    `max_requests` were issued. `send` raises on any failure; failures are counted, a shed 503
    apart (its worker waits the Retry-After it was given, as a polite client does)."""
    stream = itertools.cycle(range(len(texts)))

    def next_batch() -> list[str]:
        return [texts[next(stream)] for _ in range(inputs_per_request)]

    await asyncio.gather(*(_safe(send, next_batch()) for _ in range(warmup_requests)))
    latencies: list[float] = []
    errors: list[str] = []
    counts = {"issued": 0, "inputs": 0, "shed": 0, "shed_retry_after": 0}
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker() -> None:
        while counts["issued"] < max_requests and time.perf_counter() < deadline:
            counts["issued"] += 1
            batch = next_batch()
            t0 = time.perf_counter()
            failure = await _safe(send, batch)
            if failure is None:
                latencies.append(time.perf_counter() - t0)
                counts["inputs"] += len(batch)
            elif failure.startswith(Shed.__name__):
                counts["shed"] += 1
                counts["shed_retry_after"] += "retry-after" in failure
                await asyncio.sleep(min(_retry_after_s(failure), max(0.0, deadline - t0)))
            else:
                errors.append(failure)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "inputs_per_request": inputs_per_request,
        "requests": counts["issued"],
        "ok_requests": len(latencies),
        "inputs": counts["inputs"],
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "shed": counts["shed"],
        "shed_with_retry_after": counts["shed_retry_after"],
        "duration_s": elapsed,
        "throughput_inputs_per_s": counts["inputs"] / elapsed if elapsed > 0 else 0.0,
        "requests_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "latency_ms": percentiles(latencies),
    }


def _retry_after_s(failure: str) -> float:
    """The Retry-After a shed answer asked for (a polite client waits that long), else 0."""
    _, found, value = failure.partition("retry-after=")
    try:
        return float(value.split()[0]) if found else 0.0
    except (ValueError, IndexError):
        return 0.0


async def _safe(send: Callable[[list[str]], Awaitable[None]], batch: list[str]) -> str | None:
    try:
        await send(batch)
        return None
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def http_sender(
    host: str,
    port: int,
    paths: list[str],
    tasks: list[str] | None,
    check: bool = True,
    extra: dict[str, Any] | None = None,
) -> Callable[[list[str]], Awaitable[None]]:
    """One POST per path (concurrently, each on its own connection); done when all answered.
    `extra` fields go into every body (e.g. max_new_tokens).

    Connections are kept per asyncio task, so each closed-loop worker reuses its own.
    """
    pool: dict[int, list[Connection]] = {}

    async def send(batch: list[str]) -> None:
        me = id(asyncio.current_task())
        conns = pool.setdefault(me, [Connection(host, port) for _ in paths])
        body = {"inputs": batch} if tasks is None else {"inputs": batch, "tasks": tasks}
        body.update(extra or {})
        payload = json.dumps(body).encode()
        answers = await asyncio.gather(*(c.post(p, payload) for c, p in zip(conns, paths)))
        for (status, data), conn in zip(answers, conns):
            if status == 503:
                hint = f" retry-after={conn.retry_after}" if conn.retry_after else ""
                raise Shed(f"HTTP 503{hint}")
            if status != 200:
                raise HTTPError(f"HTTP {status}: {data[:200].decode(errors='replace')}")
            if check:
                results = json.loads(data).get("results")
                if not isinstance(results, list) or len(results) != len(batch):
                    raise HTTPError(f"expected {len(batch)} results, got {data[:200]!r}")
                if tasks and not all(t in results[0] for t in tasks):
                    raise HTTPError(f"result lacks tasks {tasks}: {data[:200]!r}")

    return send


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """One level as described by `spec` (what `level()` writes), with the client's CPU seconds."""
    import resource

    send = http_sender(
        spec["host"],
        spec["port"],
        spec["paths"],
        spec.get("tasks"),
        spec.get("check", True),
        spec.get("body"),
    )
    result = asyncio.run(
        run_load(
            send,
            spec["texts"],
            spec["concurrency"],
            spec["inputs_per_request"],
            spec["duration_s"],
            spec["max_requests"],
            spec.get("warmup_requests", 0),
        )
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def level(spec: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Run one level in a fresh `python loadgen.py` process and return its result."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "loadgen.py"), f.name],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the client's own ceiling ---------------------------------------------------------------------


async def _trivial_server(port: int) -> None:
    """Answers every POST with a fixed body: the cheapest server, to find the client's limit."""
    body = b'{"results": [{}]}'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = 0
                line = await reader.readline()
                if not line:
                    break
                while line not in (b"\r\n", b"\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    line = await reader.readline()
                await reader.readexactly(length)
                writer.write(answer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def ceiling(concurrency: int, duration_s: float, port: int) -> dict[str, Any]:
    """Requests/s this client drives against a trivial server in another process."""
    server = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "loadgen.py"), "--trivial-server", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        spec = {
            "host": "127.0.0.1",
            "port": port,
            "paths": ["/"],
            "tasks": None,
            "texts": ["x"],
            "concurrency": concurrency,
            "inputs_per_request": 1,
            "duration_s": duration_s,
            "max_requests": 10**9,
        }
        return level(spec)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    if sys.argv[1] == "--trivial-server":
        asyncio.run(_trivial_server(int(sys.argv[2])))
    else:
        with open(sys.argv[1]) as spec_file:
            print(json.dumps(run_spec(json.load(spec_file))))
