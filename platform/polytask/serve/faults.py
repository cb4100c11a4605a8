"""Injected faults for the serving chaos tests, kept out of the serve config: a replica reads
`POLYTASK_SERVE_FAULTS` (JSON) from its own environment, which a test sets through the
deployment's runtime_env. Unset (always, outside those tests) it costs one lookup per replica.

{"hang_head": TASK, "once": PATH}: the first `head_<TASK>` call that creates PATH (exclusively,
so one call across every replica and restart) never returns — for up to HANG_S — while the
replica's other calls and its health probe go on: a hung call in a live replica.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

ENV = "POLYTASK_SERVE_FAULTS"
HANG_S = 300.0  # a test that never replaces the hung replica fails instead of hanging for ever


def head_fault(task: str) -> Callable[[], None] | None:
    """What `head_<task>` runs at the start of each call, or None (no fault planned for it)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    plan = json.loads(raw)
    unknown = set(plan) - {"hang_head", "once"}
    if unknown or not isinstance(plan.get("once"), str):
        raise ValueError(f'{ENV}={raw!r}: expected {{"hang_head": TASK, "once": PATH}}')
    if plan.get("hang_head") != task:
        return None
    once = plan["once"]

    def hang_once() -> None:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another call already hung
        threading.Event().wait(HANG_S)

    return hang_once
