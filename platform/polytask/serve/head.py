"""The Head deployment: one task head on CPU, bound once per task as `head_<task>`.

A head decodes the Encoder's output with the head version trained against that output's encoder
fingerprint, loading it on demand, so versions never mix during a rolling update.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Any

from ray import serve

from polytask.serve.faults import head_fault
from polytask.serve.health import Health, apply_deadline
from polytask.serve.metrics import ServeMetrics
from polytask.serve.refs import local_bundle, model_from_config, pin_model_uri
from polytask.serve.replica import replica_identity

HEAD_VERSIONS_KEPT = 2


@serve.deployment
class Head:
    """One task head on CPU; bound once per task as `head_<task>`. Loads only `heads/<task>/`."""

    def __init__(self, model: str, task: str, device: str = "cpu") -> None:
        self.task = task
        self.device = device
        self.ref = model
        self.versions: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.lock = threading.Lock()
        self.calls = 0
        self.inputs = 0
        self.health = Health(f"head_{task}")
        self.fault = head_fault(task)  # None outside the chaos tests
        self.metrics = ServeMetrics(model)
        self._load(model, None)

    def _load(self, ref: str, fingerprint: str | None) -> tuple[Any, Any]:
        """The head for `fingerprint` (the encoder's; None = the bundle's own), loaded once."""
        from polytask.model.bundle import load_head, read_manifest

        with self.lock:
            path = local_bundle(ref)
            expected = fingerprint or read_manifest(path).fingerprint
            if expected not in self.versions:
                self.versions[expected] = load_head(path, self.task, expected, self.device)
            self.versions.move_to_end(expected)
            while len(self.versions) > HEAD_VERSIONS_KEPT:
                self.versions.popitem(last=False)
            return self.versions[expected]

    def reconfigure(self, config: dict[str, Any]) -> None:
        apply_deadline(self.health, config)
        model = model_from_config(config)
        if model is not None:
            ref = pin_model_uri(model)
            if ref != self.ref:
                self._load(ref, None)
                self.ref = ref
                self.metrics.set_model(ref)

    def predict(
        self, encoded: dict[str, Any], texts: list[str], indices: list[int] | None = None
    ) -> dict[str, Any]:
        """Decode the Encoder's output for this task: one answer per text. `indices` picks this
        head's inputs out of an encoder batch shared with requests for other tasks."""
        from polytask.model.inference import run_head
        from polytask.model.manifest import BundleError

        self.calls += 1
        self.inputs += len(texts)
        began = time.perf_counter()
        fingerprint = encoded["fingerprint"]
        with self.health.watch(not_ours=(BundleError,)):  # a foreign encoder is not our fault
            if self.fault is not None:
                self.fault()
            found = self.versions.get(fingerprint)
            head, spec = found if found is not None else self._load(encoded["model"], fingerprint)
            items = encoded["items"] if indices is None else [encoded["items"][i] for i in indices]
            answers = run_head(head, spec, items, texts)
        self.metrics.stage.observe(time.perf_counter() - began, {"stage": "head"})
        return {"answers": answers, "fingerprint": fingerprint, "model": encoded["model"]}

    def stats(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "calls": self.calls,
            "inputs": self.inputs,
            "fingerprints": list(self.versions),
            "failures_in_a_row": self.health.failures,
            "pid": os.getpid(),
            **replica_identity(),
        }

    def check_health(self) -> None:
        """Serve's periodic probe: head calls failing in a row, or one hung, fail the replica."""
        self.metrics.failures.set(self.health.failures)
        self.health.check()
