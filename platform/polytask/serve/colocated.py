"""Heads placed `with_encoder`: they run inside the Encoder replica on its own output, no hop.

A small head (a linear layer, an MLP) costs less than the call to a separate deployment that
would run it. The Encoder loads these heads with its encoder and swaps them together, so a head
always decodes the encoder output it was trained against. Each head keeps its own health count,
metrics stage and failure: an input that breaks one head fails that task's call, like a separate
head's, and never counts against the encoder or the other heads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from polytask.serve.health import Health, apply_deadline

Placement = Literal["separate", "with_encoder"]


@dataclass
class ColocatedHeads:
    """The co-located heads of one encoder version, read from `bundle` and checked against the
    encoder's `fingerprint`: those named at start-up at once, any other on first use (a replica
    started before a placement change, or a model switched in by `reconfigure`)."""

    bundle: Any
    fingerprint: str
    heads: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, bundle: Any, tasks: tuple[str, ...], fingerprint: str) -> ColocatedHeads:
        """`tasks`' heads that `bundle` has, loaded now."""
        from polytask.model.manifest import read_manifest

        heads = cls(bundle, fingerprint)
        known = {s.name for s in read_manifest(bundle).tasks}
        for task in tasks:
            if task in known:
                heads.get(task)
        return heads

    def get(self, task: str) -> tuple[Any, Any]:
        """(head module, TaskSpec) of `task`, loaded on first use."""
        from polytask.model.bundle import load_head

        found = self.heads.get(task)
        if found is None:
            with self.lock:
                found = self.heads.get(task) or load_head(self.bundle, task, self.fingerprint)
                self.heads[task] = found
        return found


@dataclass
class HeadWatch:
    """Health and metrics of the co-located heads of one Encoder replica, per task."""

    tasks: tuple[str, ...]
    metrics: Any  # polytask.serve.metrics.ServeMetrics
    health: dict[str, Health] = field(init=False)
    calls: dict[str, int] = field(init=False)
    config: dict[str, Any] | None = None  # the Encoder's user_config (its request deadline)

    def __post_init__(self) -> None:
        self.health = {t: self._health(t) for t in self.tasks}
        self.calls = dict.fromkeys(self.tasks, 0)

    def reconfigure(self, config: dict[str, Any] | None) -> None:
        """The app's request deadline sets when a head call counts as stuck, as for the Encoder."""
        self.config = config
        for health in self.health.values():
            apply_deadline(health, config)

    def _health(self, task: str) -> Health:
        health = Health(f"head_{task} (with_encoder)")
        apply_deadline(health, self.config)
        return health

    def run(
        self,
        heads: ColocatedHeads,
        wanted: dict[str, list[int] | None],
        items: list[Any],
        texts: list[str],
    ) -> dict[str, Any]:
        """{task: answers, or the exception its head raised} for the inputs each task wants
        (None: all); runs in a worker thread. One head failing leaves the others' answers."""
        from polytask.model.inference import run_head
        from polytask.model.manifest import BundleError

        out: dict[str, Any] = {}
        for task, indices in wanted.items():
            began = time.perf_counter()
            health = self.health.get(task) or self.health.setdefault(task, self._health(task))
            self.calls[task] = self.calls.get(task, 0) + 1
            mine = items if indices is None else [items[i] for i in indices]
            try:
                with health.watch(not_ours=(BundleError,)):
                    head, spec = heads.get(task)
                    out[task] = run_head(
                        head, spec, mine, texts if indices is None else [texts[i] for i in indices]
                    )
            except Exception as exc:  # noqa: BLE001 - that task's caller gets it, as from a head
                out[task] = exc
            self.metrics.stage.observe(time.perf_counter() - began, {"stage": f"head_{task}"})
        return out

    def check(self) -> None:
        for health in self.health.values():
            health.check()


async def colocated_answer(encoded: Any, task: str) -> dict[str, Any]:
    """A co-located task's answers from the Encoder's (shared, awaited once) response, shaped as
    a separate head's `predict` returns them; that head's failure is raised here, for its task."""
    out = await encoded
    answers = out["answers"][task]
    if isinstance(answers, BaseException):
        raise answers
    return {"answers": answers, "fingerprint": out["fingerprint"], "model": out["model"]}
