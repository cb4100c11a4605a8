"""The promotion lock: one writer at a time decides a registered model's champion alias, on any
MLflow store, with a renewed lease so a writer that died never blocks the others for good."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polytask.tracking.tags import LOCK_LEASE_TAG, LOCK_OWNER_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"  # a registered model that exists only while a writer decides
# The promotion lock's lease: its holder renews it every third of this; a lock whose lease has run
# out was left by a writer that died and is broken. A waiter gives up after LOCK_WAIT_S.
LOCK_LEASE_S = 60.0
LOCK_WAIT_S = 120.0


class PromotionLockTimeout(TimeoutError):
    """A writer gave up waiting for another's promotion lock; the message names the holder."""


class PromotionLockLost(RuntimeError):
    """The lock this writer held was broken (its lease ran out) before it wrote the alias."""


@dataclass
class _Lease:
    """A held promotion lock: the lock's name, this writer's owner token, and `check()`, which
    a writer calls right before it moves an alias."""

    client: Any
    lock: str
    owner: str

    def check(self) -> None:
        held = _holder(self.client, self.lock)
        if held is None or held[0] != self.owner:
            raise PromotionLockLost(
                f"{self.lock} is no longer held by this writer ({self.owner}); "
                f"now: {held[0] if held else 'nobody'}"
            )


@contextmanager
def promotion_lock(c: MlflowClient, name: str, timeout_s: float | None = None) -> Iterator[_Lease]:
    """One writer at a time decides `name`'s champion, on any MLflow store: a registered model
    name is unique (SQL key; the tracking server's store too), so creating `<name>.promotion-lock`
    is an atomic test-and-set. The lock carries its owner (a random token) and a lease end that a
    thread renews while the holder works, so a slow registry never makes a live holder look dead;
    only a lock whose lease has run out (its writer died) is broken. Release deletes the lock only
    if this writer still owns it. Waiting longer than `timeout_s` (default LOCK_WAIT_S) raises
    PromotionLockTimeout naming the holder."""
    import random
    import socket
    import threading
    import time

    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    owner = f"pid {os.getpid()} on {socket.gethostname()} [{uuid.uuid4().hex[:12]}]"
    wait = LOCK_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + wait
    while True:
        try:
            c.create_registered_model(
                lock,
                tags={LOCK_OWNER_TAG: owner, LOCK_LEASE_TAG: repr(time.time() + LOCK_LEASE_S)},
                description=f"held by {owner}",
            )
            break
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _break_if_expired(c, lock)
        if time.monotonic() > deadline:
            raise PromotionLockTimeout(
                f"gave up after waiting {wait:.0f} s for {lock}, held by {holder or 'nobody now'}"
            )
        time.sleep(0.02 + random.random() * 0.05)
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(c, lock, owner, stop), name="promotion-lease", daemon=True
    )
    renewer.start()
    try:
        yield _Lease(c, lock, owner)
    finally:
        stop.set()
        renewer.join()
        _release(c, lock, owner)


def _holder(c: MlflowClient, lock: str) -> tuple[str, float] | None:
    """(owner, lease end in epoch seconds) of the lock, or None when nobody holds it. A lock
    without a lease tag expires LOCK_LEASE_S after its creation."""
    from mlflow.exceptions import MlflowException

    try:
        held = c.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    tags = held.tags or {}
    try:
        until = float(tags[LOCK_LEASE_TAG])
    except (KeyError, ValueError):
        until = held.creation_timestamp / 1000 + LOCK_LEASE_S
    return tags.get(LOCK_OWNER_TAG, held.description or "?"), until


def _renew(c: MlflowClient, lock: str, owner: str, stop: Any) -> None:
    """Push the lease end forward every third of a lease while this writer owns the lock."""
    import time

    while not stop.wait(max(LOCK_LEASE_S / 3, 0.05)):
        try:
            held = _holder(c, lock)
            if held is None or held[0] != owner:
                log.warning("lost %s (now held by %s)", lock, held[0] if held else "nobody")
                return
            c.set_registered_model_tag(lock, LOCK_LEASE_TAG, repr(time.time() + LOCK_LEASE_S))
        except Exception as exc:  # noqa: BLE001 - retried next period; the lease covers a miss
            log.warning("could not renew the lease of %s: %s", lock, exc)


def _release(c: MlflowClient, lock: str, owner: str) -> None:
    try:
        held = _holder(c, lock)
        if held is not None and held[0] == owner:
            c.delete_registered_model(lock)
        elif held is not None:
            log.warning("not releasing %s: it is held by %s now, not by %s", lock, held[0], owner)
    except Exception as exc:  # noqa: BLE001 - the decision stands; the lease runs out
        log.warning("could not release %s (its lease ends in %.0f s): %s", lock, LOCK_LEASE_S, exc)


def _break_if_expired(c: MlflowClient, lock: str) -> str | None:
    """Delete the lock if its lease has run out (read twice, so a lock just re-taken by another
    writer is not deleted); return who holds it."""
    import time

    from mlflow.exceptions import MlflowException

    try:
        first = _holder(c, lock)
        if first is None or time.time() <= first[1]:
            return first[0] if first else None
        again = _holder(c, lock)
        if again is not None and again[0] == first[0] and time.time() > again[1]:
            log.warning("breaking %s: its lease ran out (holder %s)", lock, first[0])
            c.delete_registered_model(lock)
            return None
        return again[0] if again else None
    except MlflowException:
        return None  # released (or broken) meanwhile
