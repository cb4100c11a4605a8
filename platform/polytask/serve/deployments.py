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
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from polytask.serve.batching import MicroBatcher
from polytask.serve.health import Health
from polytask.serve.inputs import InputRejected
from polytask.serve.metrics import ServeMetrics
from polytask.serve.refs import local_bundle, pin_model_uri
from polytask.serve.replica import replica_identity

HEAD_VERSIONS_KEPT = 2
# Pauses before resending a request whose replica died (the last attempt's error is the answer).
RETRY_PAUSES_S = (0.0, 0.5, 2.0)


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
class _EncodeCall:
    """One `encode` call (one Ingress batch, or one direct caller): encoded together with every
    other call that arrives while the encoder is busy."""

    items: list[_Item]


@serve.deployment(name="Encoder")
class Encoder:
    """Tokenize + encoder forward; calls arriving while a forward runs (from any Ingress replica)
    are encoded together, length-sorted and cut into passes of at most `max_batch_size` inputs."""

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
        self.max_batch_size = max_batch_size
        self.health = Health("Encoder")
        self.calls = 0
        self.inputs = 0
        self.passes: list[int] = []
        self.metrics = ServeMetrics(model)
        self.batcher: MicroBatcher[_EncodeCall, tuple[str, str, list[Any]]] = MicroBatcher(
            self._encode_calls,
            size=lambda call: len(call.items),
            max_size=max(max_batch_size, 1024),
            max_in_flight=1,
            wait_s=batch_wait_timeout_s,
            on_batch=lambda size, waits: self.metrics.batch_formed("encoder", size, waits),
        )
        self.state = self._load(model)
        self.metrics.set_model(self.state.ref)

    def _load(self, ref: str) -> _EncoderState:
        from polytask.model.bundle import BundleError, load_encoder_part, read_manifest

        path = local_bundle(ref)
        manifest = read_manifest(path)
        encoder, tokenizer, fingerprint = load_encoder_part(path, self.device)
        self.loads = getattr(self, "loads", 0) + 1  # weight loads by this replica (stats)
        if fingerprint != manifest.fingerprint:
            raise BundleError(
                f"{ref}: encoder weights have fingerprint {fingerprint} but polytask.json says "
                f"{manifest.fingerprint}; the bundle was modified or is incomplete"
            )
        return _EncoderState(
            ref, encoder, tokenizer, fingerprint, manifest.pooling, manifest.max_length
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """`user_config: {model: URI}` switches the encoder in place (no replica restart); a
        version with the same encoder (e.g. one that only added heads) swaps the reference
        without reloading the weights."""
        model = _model_from(config)
        if model is not None:
            ref = pin_model_uri(model)
            if ref != self.state.ref:
                self.state = self._same_encoder(ref) or self._load(ref)
                self.metrics.set_model(ref)

    def _same_encoder(self, ref: str) -> _EncoderState | None:
        """The loaded encoder under the new reference when `ref`'s bundle has the same weights
        and settings (fingerprint, pooling, max_length), else None."""
        from dataclasses import replace

        from polytask.model.manifest import read_manifest

        manifest = read_manifest(local_bundle(ref))
        same = (manifest.fingerprint, manifest.pooling, manifest.max_length) == (
            self.state.fingerprint,
            self.state.pooling,
            self.state.max_length,
        )
        return replace(self.state, ref=ref) if same else None

    def fingerprint(self) -> str:
        return self.state.fingerprint

    def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`: forwards failing in a row with no bad
        input to blame, or one hung forward, fail the replica and Serve starts a new one."""
        self.metrics.failures.set(self.health.failures)
        self.health.check()

    def stats(self) -> dict[str, Any]:
        """`calls`: encode calls; `batches`/`batch_sizes`: inputs per gathered batch of calls."""
        batches = self.batcher.stats.as_dict()
        return {
            "calls": self.calls,
            "inputs": self.inputs,
            "batches": batches["batches"],
            "largest_batch": batches["largest_batch"],
            "batch_sizes": batches["batch_sizes"],
            "pass_sizes": list(self.passes[-100:]),
            "fingerprint": self.state.fingerprint,
            "model": self.state.ref,
            "failures_in_a_row": self.health.failures,
            "pid": os.getpid(),
            "loads": self.loads,
            **replica_identity(),
        }

    async def encode(
        self,
        texts: list[str],
        pairs: list[str] | None,
        need_pooled: bool | list[bool],
        need_tokens: bool | list[bool],
    ) -> dict[str, Any]:
        """Inputs → {fingerprint, model, items}; item i holds only what input i's heads need
        (`need_*` per input, or one flag for all)."""
        n = len(texts)
        pooled = need_pooled if isinstance(need_pooled, list) else [need_pooled] * n
        tokens = need_tokens if isinstance(need_tokens, list) else [need_tokens] * n
        if not (len(pooled) == len(tokens) == n and (pairs is None or len(pairs) == n)):
            raise ValueError("encode: pairs and need_* flags must have one entry per text")
        self.calls += 1
        self.inputs += n
        items = [
            _Item(t, pairs[i] if pairs is not None else None, pooled[i], tokens[i])
            for i, t in enumerate(texts)
        ]
        fingerprint, ref, encoded = await self.batcher.submit(_EncodeCall(items))
        return {"fingerprint": fingerprint, "model": ref, "items": encoded}

    async def _encode_calls(self, calls: list[_EncodeCall]) -> list[tuple[str, str, list[Any]]]:
        """All calls of a batch with one model version, in one worker thread."""
        state = self.state
        items = [item for call in calls for item in call.items]
        passes: list[tuple[int, dict[str, float]]] = []  # (inputs, stage seconds) per pass
        try:
            encoded = await asyncio.to_thread(self._watched_forward, state, items, passes)
        finally:
            for size, seconds in passes:
                self.metrics.passes.observe(size)
                self.metrics.stages(seconds)
        out, start = [], 0
        for call in calls:
            out.append((state.fingerprint, state.ref, encoded[start : start + len(call.items)]))
            start += len(call.items)
        return out

    def _watched_forward(
        self, state: _EncoderState, items: list[_Item], passes: list[tuple[int, dict[str, float]]]
    ) -> list[Any]:
        with self.health.watch(not_ours=(InputRejected,)):
            return self._forward(state, items, passes)

    def _forward(
        self, state: _EncoderState, items: list[_Item], passes: list[tuple[int, dict[str, float]]]
    ) -> list[Any]:
        """Singles and pairs apart, each length-sorted and cut into passes padded to their own
        longest input (what the in-process limit does); `passes` gets each pass's size and
        stage seconds (recorded by the caller, on the replica's event loop)."""
        from polytask.model.inference import encode_batch

        results: list[Any] = [None] * len(items)
        for pair_view in (False, True):
            idx = [i for i, it in enumerate(items) if (it.pair is not None) == pair_view]
            idx.sort(key=lambda i: len(items[i].text) + len(items[i].pair or ""))
            for start in range(0, len(idx), self.max_batch_size):
                chunk = idx[start : start + self.max_batch_size]
                self.passes.append(len(chunk))
                del self.passes[:-1000]
                seconds: dict[str, float] = {}
                try:
                    encoded = encode_batch(
                        state.encoder,
                        state.tokenizer,
                        [items[i].text for i in chunk],
                        [items[i].pair or "" for i in chunk] if pair_view else None,
                        max_length=state.max_length,
                        pooling=state.pooling,
                        need_pooled=any(items[i].need_pooled for i in chunk),
                        need_tokens=any(items[i].need_tokens for i in chunk),
                        device=self.device,
                        timings=seconds,
                    )
                    passes.append((len(chunk), seconds))
                except Exception:
                    _blame_input(state, items, chunk)
                    raise
                for i, enc in zip(chunk, encoded):
                    if not items[i].need_pooled:
                        enc.pooled = None
                    if not items[i].need_tokens:
                        enc.tokens = enc.word_ids = enc.word_spans = None
                    results[i] = enc
        return results


def _blame_input(state: _EncoderState, items: list[_Item], chunk: list[int]) -> None:
    """After a failed pass: InputRejected for the first input the tokenizer refuses on its own;
    nothing when every input tokenizes (the replica, not an input, is at fault)."""
    for i in chunk:
        try:
            state.tokenizer(items[i].text, items[i].pair, truncation=True, max_length=state.max_length)
        except Exception as exc:
            raise InputRejected(
                i, f"the tokenizer cannot encode it ({type(exc).__name__}); send plain text"
            ) from exc


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
        self.health = Health(f"head_{task}")
        self.metrics = ServeMetrics(model)
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
    batch_max_inputs: int = 256
    batches_in_flight: int = 2
    batch_wait_s: float = 0.005
    request_timeout_s: float = 30.0
    read_timeout_s: float = 10.0


@dataclass
class _Job:
    """One validated request waiting in the Ingress batcher."""

    inputs: list[tuple[str, str | None]]
    tasks: list[str]


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front: validates each request, then batches concurrent ones so that one Encoder call
    per text view and one call per requested head carry all their inputs."""

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
        from ray.serve.exceptions import BackPressureError

        self.metrics = ServeMetrics(self.settings.model_ref)
        self.batcher: MicroBatcher[_Job, tuple[list[dict[str, Any]], dict[str, Any]]]
        self.batcher = MicroBatcher(
            self._run_batch,
            size=lambda job: len(job.inputs),
            max_size=self.settings.batch_max_inputs,
            max_in_flight=self.settings.batches_in_flight,
            wait_s=self.settings.batch_wait_s,
            never_split=(BackPressureError,),
            on_batch=lambda size, waits: self.metrics.batch_formed("ingress", size, waits),
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """A new model reference refreshes the task list (labels) the API reports and validates."""
        from polytask.model.manifest import read_manifest  # not bundle: the Ingress needs no torch

        model = _model_from(config)
        if model is None:
            return
        ref = pin_model_uri(model)
        if ref == self.settings.model_ref:
            return
        manifest = read_manifest(local_bundle(ref))
        self.specs = {s.name: s for s in manifest.tasks if s.name in self.heads}
        self.settings.model_ref = ref
        self.metrics.set_model(ref)

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

    def stats(self) -> dict[str, Any]:
        """Requests (`jobs`) and inputs per batch sent down the pipeline."""
        return {**self.batcher.stats.as_dict(), "pid": os.getpid(), **replica_identity()}

    async def run(
        self, inputs: list[tuple[str, str | None]], tasks: list[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One validated request → (one {task: answer} per input, model info), answered from
        a batch shared with the requests that arrived while the previous batch ran.

        Predictions have no side effects, so a request whose Encoder or head replica died under
        it is sent again (Serve routes it to a live or replacement replica), a few times with a
        pause while Serve learns of the death; the HTTP deadline bounds the whole."""
        from ray.exceptions import ObjectLostError, RayActorError

        for pause_s in RETRY_PAUSES_S:
            try:
                return await self.batcher.submit(_Job(inputs, tasks))
            except (RayActorError, ObjectLostError):
                await asyncio.sleep(pause_s)
        return await self.batcher.submit(_Job(inputs, tasks))

    async def _run_batch(
        self, jobs: list[_Job]
    ) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
        """Encoder once per view (single texts, text pairs) over every input of the batch whose
        request asked for a task of that view, then each requested head once, concurrently, on
        the inputs of the requests that asked for it.

        The encoder's response is handed to the heads unresolved, so its arrays go from the encoder
        to the heads through the object store without passing through this replica.
        """
        calls = []  # (task, [(job index, first input, count)], response)
        for pair_view in (False, True):
            texts: list[str] = []
            pairs: list[str] = []
            pooled: list[bool] = []
            tokens: list[bool] = []
            spans: dict[int, tuple[int, int]] = {}  # job → (first input in this view, count)
            for j, job in enumerate(jobs):
                view = [t for t in job.tasks if self.specs[t].pair == pair_view]
                if not view:
                    continue
                levels = {self.specs[t].task_kind.level for t in view}
                spans[j] = (len(texts), len(job.inputs))
                texts += [text for text, _ in job.inputs]
                pairs += [pair or "" for _, pair in job.inputs]
                pooled += ["sentence" in levels] * len(job.inputs)
                tokens += ["token" in levels] * len(job.inputs)
            if not texts:
                continue
            encoded = self.encoder.encode.remote(
                texts, pairs if pair_view else None, pooled, tokens
            )
            view_tasks = dict.fromkeys(
                t for j in spans for t in jobs[j].tasks if self.specs[t].pair == pair_view
            )
            for task in view_tasks:
                mine = [(j, *spans[j]) for j in spans if task in jobs[j].tasks]
                indices = [i for _, start, n in mine for i in range(start, start + n)]
                every = len(indices) == len(texts)
                response = self.heads[task].predict.remote(
                    encoded,
                    texts if every else [texts[i] for i in indices],
                    None if every else indices,
                )
                calls.append((task, mine, response))
        outs = await asyncio.gather(*(response for _, _, response in calls))
        results: list[list[dict[str, Any]]] = [[{} for _ in job.inputs] for job in jobs]
        models: list[dict[str, Any] | None] = [None] * len(jobs)
        for (task, mine, _), out in zip(calls, outs):
            answers = iter(out["answers"])
            for j, _, n in mine:
                for i in range(n):
                    results[j][i][task] = next(answers)
                if models[j] is None:
                    models[j] = {**self.model_info(out["fingerprint"]), "ref": out["model"]}
        return [
            ([{t: r[t] for t in job.tasks} for r in results[j]], models[j] or self.model_info())
            for j, job in enumerate(jobs)
        ]
