"""Injected faults for the fault-tolerance tests, kept out of the experiment config: the driver
reads `POLYTASK_FAULTS` (e.g. `fail_at_epoch=1` or `{"hold_at_epoch": 1}`) and ships the plan to
the Ray Train workers in their loop config, so it reaches workers on any node.

fail_at_epoch: rank 0 raises once, after that epoch's checkpoint is committed.
hold_at_epoch: in the first attempt, rank 0 writes its pid to <storage>/<run name>/rank0.pid
halfway through that epoch and waits to be killed.
hold_batch_at_block: `polytask predict` flushes its partial output after that many scored blocks,
prints `holding pid <pid>` on stderr and waits to be killed (the kill lands mid-write).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV = "POLYTASK_FAULTS"
KNOWN = ("fail_at_epoch", "hold_at_epoch", "hold_batch_at_block")
HOLD_S = 120.0  # a chaos test that never kills the held worker fails instead of hanging


def from_env(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The fault plan in `POLYTASK_FAULTS` ({} when unset): JSON or `key=epoch[,key=epoch]`."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return {}
    fix = (
        f"{ENV}={raw!r}: expected {' or '.join(KNOWN)} set to an epoch (or block) >= 0, e.g. "
        f"{ENV}=fail_at_epoch=1 or {ENV}='{{\"hold_at_epoch\": 1}}'"
    )
    try:
        pairs = json.loads(raw) if raw.startswith("{") else dict(i.split("=", 1) for i in raw.split(","))
        plan = {key.strip(): int(value) for key, value in pairs.items()}
    except (ValueError, TypeError, AttributeError):
        raise ValueError(fix) from None
    if any(key not in KNOWN or value < 0 for key, value in plan.items()):
        raise ValueError(fix)
    return plan


def pid_file(storage: str, run_name: str) -> str | None:
    """Where a held rank 0 writes its pid (only on local storage, where a test can read it)."""
    return None if "://" in storage else str(Path(storage) / run_name / "rank0.pid")


def fail_after_checkpoint(plan: dict[str, Any], rank: int, resumed: bool, epoch: int) -> None:
    """fail_at_epoch: crash only after Ray committed this epoch's checkpoint, so the restarted
    attempt resumes past it (and, having a checkpoint, never fails again)."""
    if rank != 0 or resumed or plan.get("fail_at_epoch") != epoch:
        return
    import ray.train

    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )
    raise RuntimeError(f"fail_at_epoch={epoch}: injected failure after epoch {epoch}'s checkpoint")


def hold_for_kill(plan: dict[str, Any], rank: int, resumed: bool, pid_path: str | None) -> Any:
    """hold_at_epoch: a step hook for rank 0's first attempt (a restarted attempt starts from a
    checkpoint and never holds) that parks the worker mid-epoch so a test can SIGKILL it."""
    target = plan.get("hold_at_epoch")
    if target is None or rank != 0 or resumed or not pid_path:
        return None

    def hold(epoch: int, step: int, steps: int, losses: dict[str, float]) -> None:
        if epoch != target or step != max(1, steps // 2):
            return
        import ray.train

        ray.train.get_all_reported_checkpoints(  # the kill lands after the last checkpoint
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )
        path = Path(pid_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(path)  # the reader never sees a half-written pid
        time.sleep(HOLD_S)
        raise RuntimeError(f"hold_at_epoch={target}: nobody killed pid {os.getpid()}")

    return hold


def hold_batch(plan: dict[str, Any]) -> Any:
    """hold_batch_at_block: a hook `hook(blocks_written, writer)` for the batch driver that, at
    that block, flushes what is written so far and parks the process so a test can SIGKILL it."""
    target = plan.get("hold_batch_at_block")
    if target is None:
        return None

    def hold(blocks: int, writer: Any) -> None:
        if blocks != target:
            return
        import sys

        writer.flush()
        print(f"holding pid {os.getpid()} at block {blocks}", file=sys.stderr, flush=True)
        time.sleep(HOLD_S)
        raise RuntimeError(f"hold_batch_at_block={target}: nobody killed pid {os.getpid()}")

    return hold
