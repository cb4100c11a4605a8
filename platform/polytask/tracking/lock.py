"""The promotion lock: one writer at a time decides a registered model's champion alias, on any
MLflow store, with a renewed lease so a writer that died never blocks the others for good.

The lock is a registered model per generation, `<model>.promotion-lock.<N>`: a registered model
name is unique (an SQL key, also behind a tracking server), so creating generation N+1 is an
atomic test-and-set. A lock whose lease has run out is broken by creating the next generation,
never by deleting or editing it, so any writer breaks a lock whoever made it (the admin's
by-hand promote, killed, left one the training user may not delete). The (generation, owner)
pair is the fencing token: right before moving an alias a holder checks that its generation is
still the newest, still its own, and that its lease has at least LOCK_WRITE_MARGIN_S left.

Clocks: a lease end is the holder's wall clock plus LOCK_LEASE_S, judged by other writers on
theirs. Each writer checks, when it takes the lock, that its clock is within LOCK_SKEW_S / 2 of
the MLflow server's (the lock's creation time, stamped by the server), so any two writers differ
by at most LOCK_SKEW_S; a waiter breaks a lease only LOCK_SKEW_S after it ran out.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from polytask.tracking.tags import LOCK_LEASE_TAG, LOCK_OWNER_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"  # `<model>.promotion-lock.<N>`: exists only while a writer decides
# The lease: its holder renews it every third of this; a waiter gives up after LOCK_WAIT_S.
LOCK_LEASE_S = 60.0
LOCK_WAIT_S = 120.0
# The most two writers' clocks may differ (each is checked against the MLflow server's at
# acquire, within half of it); NTP keeps real hosts within milliseconds.
LOCK_SKEW_S = 10.0
STAMP_RESOLUTION_S = 0.001  # MLflow's creation_timestamp is in milliseconds
# A holder moves an alias only with at least this much of its lease left: the check and the
# write that follows it must finish within this (a registry call takes well under a second).
LOCK_WRITE_MARGIN_S = 20.0
_LOCK_NAME = re.compile(rf"^(?P<model>.+){re.escape(LOCK_SUFFIX)}(?:\.(?P<gen>\d+))?$")


class PromotionLockTimeout(TimeoutError):
    """A writer gave up waiting for another's promotion lock; the message names the holder."""


class PromotionLockLost(RuntimeError):
    """The lock this writer held was broken (its lease ran out) before it wrote the alias."""


class PromotionClockSkew(RuntimeError):
    """This host's clock is too far from the MLflow server's for leases to be judged safely."""


def is_lock_name(name: str) -> bool:
    """Whether a registered model is a promotion lock (hidden from model listings)."""
    return _LOCK_NAME.match(name) is not None


def lock_name(name: str, generation: int) -> str:
    return f"{name}{LOCK_SUFFIX}.{generation}"


@dataclass
class _Held:
    """One generation of a model's lock as the registry shows it."""

    generation: int
    name: str
    owner: str
    lease_until: float


def _locks(c: MlflowClient, name: str) -> list[_Held]:
    """Every generation of `name`'s lock, oldest first. A legacy `<model>.promotion-lock` counts
    as generation 0; a lock without a lease tag expires LOCK_LEASE_S after its creation."""
    pattern = name.replace("'", "\\'") + LOCK_SUFFIX + "%"
    found, token = [], None
    while True:
        page = c.search_registered_models(
            filter_string=f"name LIKE '{pattern}'", max_results=100, page_token=token
        )
        for rm in page:
            match = _LOCK_NAME.match(rm.name)
            if match is None or match["model"] != name:
                continue  # LIKE also matched `_`/`%` in other names
            tags = rm.tags or {}
            try:
                until = float(tags[LOCK_LEASE_TAG])
            except (KeyError, ValueError):
                until = rm.creation_timestamp / 1000 + LOCK_LEASE_S
            owner = tags.get(LOCK_OWNER_TAG, rm.description or "?")
            found.append(_Held(int(match["gen"] or 0), rm.name, owner, until))
        token = page.token
        if not token:
            return sorted(found, key=lambda h: h.generation)


@dataclass
class _Lease:
    """A held promotion lock: its generation and owner token (the fencing token), and its lease
    end as last renewed. `check()` is called right before an alias moves."""

    client: Any
    model: str
    generation: int
    owner: str
    lease_until: float
    lost: str | None = field(default=None)

    @property
    def lock(self) -> str:
        return lock_name(self.model, self.generation)

    def check(self) -> None:
        """Raise PromotionLockLost unless this writer may write now: its generation is the newest
        and its own, and its lease has LOCK_WRITE_MARGIN_S left on this host's clock."""
        import time

        if self.lost is None:
            newest = (_locks(self.client, self.model) or [None])[-1]
            left = self.lease_until - time.time()
            if newest is None or (newest.generation, newest.owner) != (self.generation, self.owner):
                now = f"{newest.name} by {newest.owner}" if newest else "nobody"
                self.lost = f"the lock was broken and is now held as {now}"
            elif left < min(LOCK_WRITE_MARGIN_S, LOCK_LEASE_S / 3):
                self.lost = f"its lease has {left:.1f} s left, under the write margin"
        if self.lost is not None:
            raise PromotionLockLost(
                f"{self.lock} is no longer held by this writer ({self.owner}): {self.lost}; "
                "the alias was not moved"
            )


@contextmanager
def promotion_lock(c: MlflowClient, name: str, timeout_s: float | None = None) -> Iterator[_Lease]:
    """Hold `name`'s promotion lock for a block (see the module doc). Waiting longer than
    `timeout_s` (default LOCK_WAIT_S) raises PromotionLockTimeout naming the holder."""
    import random
    import socket
    import threading
    import time

    from mlflow.exceptions import MlflowException

    owner = f"pid {os.getpid()} on {socket.gethostname()} [{uuid.uuid4().hex[:12]}]"
    wait = LOCK_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + wait
    while True:
        held = _locks(c, name)
        newest = held[-1] if held else None
        if newest is None or time.time() > newest.lease_until + LOCK_SKEW_S:
            generation = newest.generation + 1 if newest else 1
            before = time.time()
            until = before + LOCK_LEASE_S
            try:
                created = c.create_registered_model(
                    lock_name(name, generation),
                    tags={LOCK_OWNER_TAG: owner, LOCK_LEASE_TAG: repr(until)},
                    description=f"held by {owner}",
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            else:
                lease = _Lease(c, name, generation, owner, until)
                _check_clock(c, lease, before, time.time(), created)
                if newest is not None:
                    log.warning("broke %s: its lease ran out (holder %s)", newest.name, newest.owner)
                _forget(c, held)
                break
        if time.monotonic() > deadline:
            holder = f"{newest.name} by {newest.owner}" if newest else "nobody now"
            raise PromotionLockTimeout(f"gave up after waiting {wait:.0f} s for {holder}")
        time.sleep(0.02 + random.random() * 0.05)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease, stop), name="promotion-lease", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        _release(lease)


def _check_clock(c: MlflowClient, lease: _Lease, before: float, after: float, created: Any) -> None:
    """Refuse the lock when this host's clock is more than LOCK_SKEW_S / 2 off the server's (the
    server stamped the lock's creation time between `before` and `after` on this clock)."""
    stamped = (getattr(created, "creation_timestamp", None) or 0) / 1000
    if not stamped:
        return
    # the server stamps whole milliseconds, so a stamp up to 1 ms under `before` is on time
    off = max(before - STAMP_RESOLUTION_S - stamped, stamped - after, 0.0)
    if off > LOCK_SKEW_S / 2:
        _release(lease)
        raise PromotionClockSkew(
            f"this host's clock is {off:.1f} s off the MLflow server's; the promotion lock "
            f"needs every writer within {LOCK_SKEW_S / 2:.0f} s of it (sync the clock with NTP)"
        )


def _forget(c: MlflowClient, older: list[_Held]) -> None:
    """Delete superseded generations where allowed (another user's stays, harmlessly)."""
    for held in older:
        try:
            c.delete_registered_model(held.name)
        except Exception:  # noqa: BLE001 - not ours to delete, or gone already
            log.debug("left %s (held by %s) in place", held.name, held.owner)


def _renew(lease: _Lease, stop: Any) -> None:
    """Push the lease end forward every third of a lease while this writer still holds the
    newest generation and its lease has not run out (a paused holder never revives one)."""
    import time

    while not stop.wait(max(LOCK_LEASE_S / 3, 0.05)):
        try:
            if time.time() > lease.lease_until:
                lease.lost = "its lease ran out before it was renewed"
            newest = (_locks(lease.client, lease.model) or [None])[-1]
            if newest is None or (newest.generation, newest.owner) != (lease.generation, lease.owner):
                lease.lost = "another writer holds a newer generation"
            if lease.lost is not None:
                log.warning("lost %s: %s", lease.lock, lease.lost)
                return
            until = time.time() + LOCK_LEASE_S
            lease.client.set_registered_model_tag(lease.lock, LOCK_LEASE_TAG, repr(until))
            lease.lease_until = until
        except Exception as exc:  # noqa: BLE001 - retried next period; the lease covers a miss
            log.warning("could not renew the lease of %s: %s", lease.lock, exc)


def _release(lease: _Lease) -> None:
    try:
        newest = (_locks(lease.client, lease.model) or [None])[-1]
        if newest is not None and (newest.generation, newest.owner) == (lease.generation, lease.owner):
            lease.client.delete_registered_model(lease.lock)
    except Exception as exc:  # noqa: BLE001 - the decision stands; the lease runs out
        log.warning("could not release %s (its lease ends in %.0f s): %s", lease.lock, LOCK_LEASE_S, exc)
