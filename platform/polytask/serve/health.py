"""Replica health for Serve's `check_health`: a replica that keeps failing on its own, or whose
work hangs, reports unhealthy so Serve replaces it; a bad input never counts against it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Three failures in a row that no input explains: one can be bad luck, three is a broken replica.
FAIL_AFTER = 3
# A single forward pass or head call this long is hung (a full batch takes well under a second
# on CPU for the models served here).
STUCK_AFTER_S = 120.0


@dataclass
class Health:
    """Counts failures of watched work in a row; `check()` raises once the replica looks broken."""

    name: str
    fail_after: int = FAIL_AFTER
    stuck_after_s: float = STUCK_AFTER_S
    failures: int = 0
    last_error: str = ""
    busy_since: float | None = None

    @contextmanager
    def watch(self, not_ours: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Time the work; a success resets the count, an error not in `not_ours` adds one."""
        self.busy_since = time.monotonic()
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
        finally:
            self.busy_since = None

    def check(self) -> None:
        """Serve's `check_health`: raising marks the replica unhealthy and Serve replaces it."""
        if self.failures >= self.fail_after:
            raise RuntimeError(
                f"{self.name}: {self.failures} calls in a row failed with no bad input to blame "
                f"(last: {self.last_error}); asking Serve for a new replica"
            )
        busy = self.busy_since
        if busy is not None and time.monotonic() - busy > self.stuck_after_s:
            raise RuntimeError(
                f"{self.name}: a call has run for over {self.stuck_after_s:.0f} s; asking Serve "
                "for a new replica"
            )
