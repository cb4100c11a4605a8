"""The three Serve deployments: one shared Encoder, one Head per task, and the HTTP Ingress.

Every replica resolves the model reference itself (replicas on other nodes cannot read the
driver's files). Encoder outputs carry the encoder fingerprint and model reference, and a head
decodes them with the head trained against that fingerprint, loading it on demand: during a
rolling update or an in-place `reconfigure`, old and new replicas can mix without ever pairing
one version's encoder states with another version's head.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from polytask.serve.refs import local_bundle, pin_model_uri
from polytask.serve.replica import replica_identity

HEAD_VERSIONS_KEPT = 2


def _model_from(config: dict[str, Any] | None) -> str | None:
    model = (config or {}).get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError("user_config.model must be a model URI or bundle path string")
    return model


@dataclass
class _EncoderState:
    """One loaded encoder version; swapped as a whole so a batch never mixes versions."""

    ref: str
    encoder: Any
    tokenizer: Any
    fingerprint: str
    pooling: str
    max_length: int


@dataclass
class _Item:
    text: str
    pair: str | None
    need_pooled: bool
    need_tokens: bool


@dataclass
class _Counters:
    calls: int = 0
    inputs: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)


@serve.deployment(name="Encoder")
class Encoder:
    """Tokenize + encoder forward with cross-request dynamic batching; returns numpy arrays."""

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.005,
    ) -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "device: cuda, but this Encoder replica sees no GPU; give the Encoder deployment "
                "ray_actor_options.num_gpus: 1, or set device: cpu"
            )
        self.device = device
        self.counters = _Counters()
        self._encode_items.set_max_batch_size(max_batch_size)
        self._encode_items.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.state = self._load(model)

    def _load(self, ref: str) -> _EncoderState:
        from polytask.model.bundle import BundleError, load_encoder_part, read_manifest

        path = local_bundle(ref)
        manifest = read_manifest(path)
        encoder, tokenizer, fingerprint = load_encoder_part(path, self.device)
        if fingerprint != manifest.fingerprint:
            raise BundleError(
                f"{ref}: encoder weights have fingerprint {fingerprint} but polytask.json says "
                f"{manifest.fingerprint}; the bundle was modified or is incomplete"
            )
        return _EncoderState(
            ref, encoder, tokenizer, fingerprint, manifest.pooling, manifest.max_length
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """`user_config: {model: URI}` switches the encoder in place (no replica restart)."""
        model = _model_from(config)
        if model is not None:
            ref = pin_model_uri(model)
            if ref != self.state.ref:
                self.state = self._load(ref)

    def fingerprint(self) -> str:
        return self.state.fingerprint

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "calls": c.calls,
            "inputs": c.inputs,
            "batches": c.batches,
            "largest_batch": c.largest_batch,
            "batch_sizes": list(c.batch_sizes[-100:]),
            "fingerprint": self.state.fingerprint,
            "model": self.state.ref,
            **replica_identity(),
        }

    async def encode(
        self, texts: list[str], pairs: list[str] | None, need_pooled: bool, need_tokens: bool
    ) -> dict[str, Any]:
        """One request's inputs → {fingerprint, model, items}; items hold only what was asked for."""
        self.counters.calls += 1
        self.counters.inputs += len(texts)
        items = [
            _Item(t, pairs[i] if pairs is not None else None, need_pooled, need_tokens)
            for i, t in enumerate(texts)
        ]
        for _ in range(3):  # a reconfigure between two batches of one request: encode again
            outs = await asyncio.gather(*(self._encode_items(item) for item in items))
            if len({fp for fp, _, _ in outs}) == 1:
                break
        else:
            raise RuntimeError("the encoder model kept changing during this request; retry it")
        fingerprint, ref, _ = outs[0]
        return {"fingerprint": fingerprint, "model": ref, "items": [enc for _, _, enc in outs]}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode_items(self, items: list[_Item]) -> list[tuple[str, str, Any]]:
        """A batch of inputs from any number of requests; singles and pairs run as two sub-batches,
        each padded to its own longest input."""
        from polytask.model.inference import encode_batch

        state = self.state
        c = self.counters
        c.batches += 1
        c.largest_batch = max(c.largest_batch, len(items))
        c.batch_sizes.append(len(items))
        del c.batch_sizes[:-1000]
        results: list[tuple[str, str, Any]] = [None] * len(items)  # type: ignore[list-item]
        for pair_view in (False, True):
            idx = [i for i, it in enumerate(items) if (it.pair is not None) == pair_view]
            if not idx:
                continue
            encoded = await asyncio.to_thread(
                encode_batch,
                state.encoder,
                state.tokenizer,
                [items[i].text for i in idx],
                [items[i].pair for i in idx] if pair_view else None,
                max_length=state.max_length,
                pooling=state.pooling,
                need_pooled=any(items[i].need_pooled for i in idx),
                need_tokens=any(items[i].need_tokens for i in idx),
                device=self.device,
            )
            for i, enc in zip(idx, encoded):
                if not items[i].need_pooled:
                    enc.pooled = None
                if not items[i].need_tokens:
                    enc.tokens = enc.word_ids = enc.word_spans = None
                results[i] = (state.fingerprint, state.ref, enc)
        return results


@serve.deployment
class Head:
    """One task head on CPU; bound once per task as `head_<task>`. Loads only `heads/<task>/`."""

    def __init__(self, model: str, task: str) -> None:
        self.task = task
        self.ref = model
        self.versions: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.lock = threading.Lock()
        self.calls = 0
        self.inputs = 0
        self._load(model, None)

    def _load(self, ref: str, fingerprint: str | None) -> tuple[Any, Any]:
        """The head for `fingerprint` (the encoder's; None = the bundle's own), loaded once."""
        from polytask.model.bundle import load_head, read_manifest

        with self.lock:
            path = local_bundle(ref)
            expected = fingerprint or read_manifest(path).fingerprint
            if expected not in self.versions:
                self.versions[expected] = load_head(path, self.task, expected)
            self.versions.move_to_end(expected)
            while len(self.versions) > HEAD_VERSIONS_KEPT:
                self.versions.popitem(last=False)
            return self.versions[expected]

    def reconfigure(self, config: dict[str, Any]) -> None:
        model = _model_from(config)
        if model is not None:
            ref = pin_model_uri(model)
            if ref != self.ref:
                self._load(ref, None)
                self.ref = ref

    def predict(self, encoded: dict[str, Any], texts: list[str]) -> dict[str, Any]:
        """Decode the Encoder's output for this task: one answer per input."""
        from polytask.model.inference import run_head

        self.calls += 1
        self.inputs += len(texts)
        fingerprint = encoded["fingerprint"]
        found = self.versions.get(fingerprint)
        head, spec = found if found is not None else self._load(encoded["model"], fingerprint)
        answers = run_head(head, spec, encoded["items"], texts)
        return {"answers": answers, "fingerprint": fingerprint, "model": encoded["model"]}

    def stats(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "calls": self.calls,
            "inputs": self.inputs,
            "fingerprints": list(self.versions),
            **replica_identity(),
        }


@dataclass
class IngressSettings:
    """What the Ingress needs from the args; plain data so it travels as a constructor argument."""

    model_uri: str
    model_ref: str
    variant: str
    tasks: list[dict[str, Any]]
    max_inputs_per_request: int
    max_chars_per_input: int
    overflow: str
    max_body_bytes: int
    api_key_env: str | None = None


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front: validates requests, calls the Encoder once per text view and the heads concurrently."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        heads: dict[str, DeploymentHandle],
        settings: dict[str, Any],
    ) -> None:
        from polytask.tasks import TaskSpec

        self.encoder = encoder
        self.heads = heads
        self.settings = IngressSettings(**settings)
        self.specs = {
            s["name"]: TaskSpec.from_dict(s) for s in self.settings.tasks if s["name"] in heads
        }
        self.api_key: str | None = None
        if self.settings.api_key_env:
            self.api_key = os.environ.get(self.settings.api_key_env) or None
            if self.api_key is None:
                raise RuntimeError(
                    f"api_key_env: environment variable {self.settings.api_key_env} is empty or not "
                    "set on the Ingress replica; set it (runtime_env env_vars, a Kubernetes secret) "
                    "or remove api_key_env"
                )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """A new model reference refreshes the task list (labels) the API reports and validates."""
        from polytask.model.bundle import read_manifest

        model = _model_from(config)
        if model is None:
            return
        ref = pin_model_uri(model)
        if ref == self.settings.model_ref:
            return
        manifest = read_manifest(local_bundle(ref))
        self.specs = {s.name: s for s in manifest.tasks if s.name in self.heads}
        self.settings.model_ref = ref

    def __serve_build_asgi_app__(self):
        from polytask.serve.http import create_api

        return create_api(self)

    def model_info(self, fingerprint: str | None = None) -> dict[str, Any]:
        return {
            "uri": self.settings.model_uri,
            "ref": self.settings.model_ref,
            "variant": self.settings.variant,
            "fingerprint": fingerprint,
        }

    async def run(
        self, inputs: list[tuple[str, str | None]], tasks: list[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Encoder once per view (single texts, text pairs), then the views' heads concurrently.

        The encoder's response is handed to the heads unresolved, so its arrays go from the encoder
        to the heads through the object store without passing through this replica.
        """
        texts = [text for text, _ in inputs]
        calls = []
        for pair_view in (False, True):
            view = [t for t in tasks if self.specs[t].task_kind.pair == pair_view]
            if not view:
                continue
            levels = {self.specs[t].task_kind.level for t in view}
            pairs = [pair or "" for _, pair in inputs] if pair_view else None
            encoded = self.encoder.encode.remote(
                texts, pairs, "sentence" in levels, "token" in levels
            )
            calls += [(t, self.heads[t].predict.remote(encoded, texts)) for t in view]
        outs = await asyncio.gather(*(response for _, response in calls))
        results: list[dict[str, Any]] = [{} for _ in inputs]
        for (task, _), out in zip(calls, outs):
            for i, answer in enumerate(out["answers"]):
                results[i][task] = answer
        model = {**self.model_info(outs[0]["fingerprint"]), "ref": outs[0]["model"]}
        return results, model
