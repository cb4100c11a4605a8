"""Replica health for Serve's `check_health`: a replica that keeps failing on its own, or whose
work hangs, reports unhealthy so Serve replaces it; a bad input never counts against it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Three failures in a row that no input explains: one can be bad luck, three is a broken replica.
FAIL_AFTER = 3
# A single forward pass or head call this long is hung (a full batch takes well under a second
# on CPU for the models served here). Replicas that know the request deadline use stuck_after().
STUCK_AFTER_S = 120.0


def stuck_after(request_timeout_s: float) -> float:
    """A call still running at twice the request deadline is hung: its caller gave up on it
    long ago, and nothing legitimate takes that long."""
    return 2.0 * request_timeout_s


def apply_deadline(health: Health, config: dict[str, Any] | None) -> None:
    """A deployment's `user_config.request_timeout_s` (the app's request deadline) sets when
    one of its calls counts as stuck."""
    timeout = (config or {}).get("request_timeout_s")
    if timeout is not None:
        health.stuck_after_s = stuck_after(float(timeout))


@dataclass
class Health:
    """Counts failures of watched work in a row and times every call on its own (calls run
    concurrently: a head's in a thread pool, batches side by side); `check()` raises once the
    replica looks broken or its oldest running call is stuck."""

    name: str
    fail_after: int = FAIL_AFTER
    stuck_after_s: float = STUCK_AFTER_S
    failures: int = 0
    last_error: str = ""
    running: dict[int, float] = field(default_factory=dict)  # call → start (monotonic)
    _ids: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Record the call's start until it ends, whatever the outcome."""
        call = next(self._ids)
        self.running[call] = time.monotonic()
        try:
            yield
        finally:
            self.running.pop(call, None)

    @contextmanager
    def watch(self, not_ours: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Time the work; a success resets the count, an error not in `not_ours` adds one."""
        with self.timed():
            try:
                yield
            except not_ours:
                raise
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                raise
            else:
                self.failures = 0

    def oldest_s(self) -> float:
        """How long the oldest running call has run (0 when none runs)."""
        starts = list(self.running.values())  # a copy: calls start and end in other threads
        return time.monotonic() - min(starts) if starts else 0.0

    def check(self) -> None:
        """Serve's `check_health`: raising marks the replica unhealthy and Serve replaces it."""
        if self.failures >= self.fail_after:
            raise RuntimeError(
                f"{self.name}: {self.failures} calls in a row failed with no bad input to blame "
                f"(last: {self.last_error}); asking Serve for a new replica"
            )
        oldest = self.oldest_s()
        if oldest > self.stuck_after_s:
            raise RuntimeError(
                f"{self.name}: a call has run for over {self.stuck_after_s:g} s ({oldest:.0f} s, "
                f"{len(self.running)} running); asking Serve for a new replica"
            )
