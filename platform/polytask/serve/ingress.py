"""The Ingress deployment: the HTTP front (routes in `serve.http`) and the batching of requests.

Validated requests that arrive while a batch runs are gathered into the next one, so one Encoder
call per text view and one call per requested head carry all their inputs. Every replica resolves
the model reference itself (replicas on other nodes cannot read the driver's files).

Failure policy (docs/reliability.md): every downstream call of a batch is bounded by the latest
deadline of its requests and cancelled there; a batch whose Encoder or head replica died fails as
a whole (never split), and each of its requests is sent once more, after a random pause, if its
deadline leaves time; past that, or when the retry fails too, the answer is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from polytask.model.manifest import Manifest, read_manifest  # not bundle: no torch here
from polytask.model.plan import plan_requests
from polytask.serve.args import ServeArgs
from polytask.serve.batching import MicroBatcher
from polytask.serve.colocated import colocated_answer
from polytask.serve.health import Health, stuck_after
from polytask.serve.levers import active_levers, require_levers
from polytask.serve.metrics import ServeMetrics
from polytask.serve.refs import local_bundle, model_from_config, pin_model_uri
from polytask.serve.replica import replica_identity
from polytask.serve.validation import APIError, check_sampling

# A request whose replica died is sent once more after a random pause of up to this (spreading
# the retries of a failed batch), if at least RETRY_MIN_LEFT_S of its deadline is left then.
RETRY_JITTER_S = 0.25
RETRY_MIN_LEFT_S = 0.1
# What a 503 tells clients to wait: about the time Serve takes to notice a dead replica.
RETRY_AFTER_S = 2
# The Decoder is told the request's deadline this much later than the Ingress's: the Ingress's
# own timeout (504) answers first, the Decoder's ends the rows should a cancel get lost.
DECODER_DEADLINE_SLACK_S = 0.5


@dataclass
class _Job:
    """One validated request waiting in the Ingress batcher, with its deadline (monotonic)."""

    inputs: list[tuple[str, str | None]]
    tasks: list[str]
    deadline: float
    lengths: dict[str, tuple[int, int]] = field(default_factory=dict)  # generation task → max, min


class _ReplicaGone(Exception):
    """A downstream replica died under a batch call (no request's fault: never split)."""


def _died(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it: Serve wraps the death of the Encoder a head call
    depends on) is a replica's death."""
    from ray.exceptions import ObjectLostError, RayActorError

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, RayActorError | ObjectLostError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _unavailable(why: str) -> APIError:
    return APIError(
        503,
        "unavailable",
        f"{why}; a replacement is starting: retry after {RETRY_AFTER_S} s",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front: validates each request, then batches concurrent ones so that one Encoder call
    per text view and one call per requested head carry all their inputs."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        heads: dict[str, DeploymentHandle | None],
        args: ServeArgs,
        ref: str,
        manifest: Manifest,
    ) -> None:
        """`args` as the application was given them; `ref` the pinned model reference and
        `manifest` its bundle's, read once by the builder (a new replica reads no bundle).
        `heads[task]` is None for a head placed `with_encoder` (it runs inside the Encoder)."""
        from ray.serve.exceptions import BackPressureError

        require_levers(args.levers or (), "the Ingress replica")
        self.encoder = encoder
        self.heads = heads
        self.args = args
        self.ref = ref
        self.variant = manifest.variant
        self.specs = {s.name: s for s in manifest.tasks if s.name in heads}
        self.api_key = _api_key(args.api_key_env)
        self.metrics = ServeMetrics(ref)
        # the batches in flight, each timed: one still running past stuck_after holds a slot
        self.health = Health("Ingress", stuck_after_s=stuck_after(args.request_timeout_s))
        self.retried = 0  # requests sent again after a replica died under them
        self.batcher: MicroBatcher[_Job, tuple[list[dict[str, Any]], dict[str, Any]]]
        self.batcher = MicroBatcher(
            self._run_batch,
            size=lambda job: len(job.inputs),
            max_size=args.ingress_batch_inputs,
            max_in_flight=args.ingress_batches_in_flight,
            wait_s=args.batch_wait_timeout_s,
            never_split=(BackPressureError, TimeoutError, _ReplicaGone),
            on_batch=lambda size, waits: self.metrics.batch_formed("ingress", size, waits),
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """A new model reference refreshes the task list (labels) the API reports and validates."""
        model = model_from_config(config)
        if model is None:
            return
        ref = pin_model_uri(model)
        if ref == self.ref:
            return
        manifest = read_manifest(local_bundle(ref))
        self.specs = {s.name: s for s in manifest.tasks if s.name in self.heads}
        self.ref = ref
        self.metrics.set_model(ref)

    def __serve_build_asgi_app__(self):
        from polytask.serve.http import create_api

        return create_api(self)

    def model_info(self, fingerprint: str | None = None) -> dict[str, Any]:
        return {
            "uri": self.args.model,
            "ref": self.ref,
            "variant": self.variant,
            "fingerprint": fingerprint,
        }

    def stats(self) -> dict[str, Any]:
        """Requests (`jobs`) and inputs per batch sent down the pipeline; `calls`: batch calls
        made downstream (each: an Encoder call per view and a call per requested head);
        `levers`: the Serve levers in this replica's environment."""
        return {
            **self.batcher.stats.as_dict(),
            "retried": self.retried,
            "levers": active_levers(),
            "pid": os.getpid(),
            **replica_identity(),
        }

    def check_health(self) -> None:
        """Serve's periodic probe: a batch still running at twice the request deadline holds one
        of the replica's batch slots for good, so the replica asks to be replaced."""
        self.health.check()

    async def run(
        self,
        inputs: list[tuple[str, str | None]],
        tasks: list[str],
        lengths: dict[str, tuple[int, int]] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One validated request → (one {task: answer} per input, model info).

        Non-generation tasks are answered from a batch shared with the requests that arrived
        while the previous batch ran (`_batched`); each generation task's rows go to the Encoder
        and straight on to its Decoder (`_generated`), which batches them itself, step by step.
        So a request that asks no generation task never waits for a decode, and one that asks
        both waits only for its own rows. Cancelling this call (the client went away, the
        deadline passed) cancels its Decoder calls, whose rows leave at the next step.
        `lengths`: (max_new_tokens, min_new_tokens) of each generation task asked for;
        `sampling`: {temperature, top_p, seed} or None (greedy)."""
        lengths = lengths or {}
        sampling = check_sampling(self.specs, tasks, sampling)
        deadline = time.monotonic() + self.args.request_timeout_s
        generated = [t for t in tasks if self.specs[t].is_generation]
        rest = [t for t in tasks if t not in generated]
        parts = [self._batched(inputs, rest, lengths, deadline)] if rest else []
        parts += [self._generated(inputs, t, lengths.get(t), sampling, deadline) for t in generated]
        outs = await _all_or_none(parts)
        results: list[dict[str, Any]] = [{} for _ in inputs]
        model = None
        for answers, info in outs:
            model = model or info
            for mine, theirs in zip(results, answers):
                mine.update(theirs)
        return [{t: r[t] for t in tasks} for r in results], model or self.model_info()

    async def _generated(
        self,
        inputs: list[tuple[str, str | None]],
        task: str,
        lengths: tuple[int, int] | None,
        sampling: dict[str, Any] | None,
        deadline: float,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One generation task's answers for this request's inputs: Encoder, then the Decoder
        (given the time left, so its rows also leave on their own at the deadline)."""
        spec = self.specs[task]
        most, least = lengths or (spec.generation.max_new_tokens, 0)
        (view,) = plan_requests(self.specs, [(inputs, [task])]).views
        encoded = self.encoder.encode.remote(view.texts, view.pairs, view.pooled, view.tokens)
        left = deadline - time.monotonic()
        response = self.heads[task].predict.remote(
            encoded, view.texts, None, most, least, sampling, left + DECODER_DEADLINE_SLACK_S
        )
        try:
            out = await asyncio.wait_for(response, max(left, 0.0))
        except (TimeoutError, asyncio.CancelledError):
            response.cancel()
            encoded.cancel()
            raise
        except Exception as exc:
            if _died(exc):
                raise _unavailable("a model replica died under this request") from exc
            raise
        info = {**self.model_info(out["fingerprint"]), "ref": out["model"]}
        return [{task: answer} for answer in out["answers"]], info

    async def _batched(
        self,
        inputs: list[tuple[str, str | None]],
        tasks: list[str],
        lengths: dict[str, tuple[int, int]],
        deadline: float,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The non-generation tasks, answered from a shared batch.

        Predictions have no side effects, so a request whose Encoder or head replica died under
        it is sent once more (Serve routes it to a live or replacement replica) after a random
        pause, if its deadline leaves time; otherwise, or if that fails too, it gets 503 with
        Retry-After."""
        job = _Job(inputs, tasks, deadline, lengths)
        try:
            return await self.batcher.submit(job)
        except _ReplicaGone:
            pass
        pause = random.uniform(0, RETRY_JITTER_S)
        if job.deadline - time.monotonic() - pause < RETRY_MIN_LEFT_S:
            raise _unavailable("a model replica died under this request") from None
        await asyncio.sleep(pause)
        self.retried += 1
        try:
            return await self.batcher.submit(job)
        except _ReplicaGone:
            raise _unavailable("model replicas died under this request twice") from None
        except TimeoutError:
            raise _unavailable(
                "a model replica died under this request and none answered its retry in time"
            ) from None

    async def stream(
        self,
        item: tuple[str, str | None],
        task: str,
        lengths: tuple[int, int],
        sampling: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """One input of a generation task: the Decoder's events (a token each, then the answer)
        as they come; closing this generator cancels the decode's share for this input."""
        sampling = check_sampling(self.specs, [task], sampling)
        (view,) = plan_requests(self.specs, [([item], [task])]).views
        encoded = self.encoder.encode.remote(view.texts, view.pairs, view.pooled, view.tokens)
        events = self.heads[task].options(stream=True).stream.remote(
            encoded, *lengths, sampling, self.args.request_timeout_s + DECODER_DEADLINE_SLACK_S
        )
        try:
            async for event in events:
                yield event
        finally:
            events.cancel()

    def _lengths(self, task: str, jobs: list[tuple[_Job, int]]) -> dict[str, list[int]]:
        """A generation head's per-input max/min new tokens (each request's own); {} otherwise."""
        spec = self.specs[task]
        if not spec.is_generation:
            return {}
        default = (spec.generation.max_new_tokens, 0)
        per_input = [job.lengths.get(task, default) for job, n in jobs for _ in range(n)]
        return {
            "max_new_tokens": [most for most, _ in per_input],
            "min_new_tokens": [least for _, least in per_input],
        }

    async def _run_batch(
        self, jobs: list[_Job]
    ) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
        """Encoder once per view (single texts, text pairs) over every input of the batch whose
        request asked for a task of that view, then each requested head once, concurrently, on
        the inputs of the requests that asked for it; heads placed `with_encoder` run in the
        Encoder call itself, which then returns items only when a separate head needs them.

        The encoder's response is handed to the heads unresolved, so its arrays go from the encoder
        to the heads through the object store without passing through this replica. Every call
        is cancelled at the latest deadline of the batch's requests (TimeoutError).
        """
        with self.health.timed():
            return await self._calls(jobs, max(job.deadline for job in jobs))

    async def _calls(
        self, jobs: list[_Job], deadline: float
    ) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
        plan = plan_requests(self.specs, [(job.inputs, job.tasks) for job in jobs])
        calls = []  # (call, response)
        sent = []  # every response, the encoder's included: cancelled together at the deadline
        for view in plan.views:
            here = {c.task: c.positions for c in view.calls if self.heads[c.task] is None}
            encoded = self.encoder.encode.remote(
                view.texts, view.pairs, view.pooled, view.tokens, here, len(here) < len(view.calls)
            )
            sent.append(encoded)
            shared = asyncio.ensure_future(encoded) if here else None
            for call in view.calls:
                if self.heads[call.task] is None:
                    response = asyncio.ensure_future(colocated_answer(shared, call.task))
                else:
                    response = self.heads[call.task].predict.remote(
                        encoded,
                        view.texts_of(call),
                        call.positions,
                        **self._lengths(call.task, [(jobs[j], n) for j, _, n in call.spans]),
                    )
                calls.append((call, response))
                sent.append(response)
        try:
            outs = await asyncio.wait_for(
                asyncio.gather(*(response for _, response in calls)),
                max(deadline - time.monotonic(), 0.0),
            )
        except TimeoutError:
            for response in sent:
                response.cancel()
            raise
        except Exception as exc:
            if _died(exc):
                raise _ReplicaGone(f"{type(exc).__name__}: {exc}"[:300]) from exc
            raise
        models: list[dict[str, Any] | None] = [None] * len(jobs)
        for (call, _), out in zip(calls, outs):
            for j, _, _ in call.spans:
                if models[j] is None:
                    models[j] = {**self.model_info(out["fingerprint"]), "ref": out["model"]}
        results = plan.answers([out["answers"] for out in outs])
        return [(results[j], models[j] or self.model_info()) for j in range(len(jobs))]


async def _all_or_none(parts: list[Any]) -> list[Any]:
    """Every part's result; when one fails (or this is cancelled), the others are cancelled
    before the error goes on, so no decode runs on for a request that already failed."""
    tasks = [asyncio.ensure_future(part) for part in parts]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _api_key(env: str | None) -> str | None:
    """The API key from the replica's environment (None: no auth); a named but empty variable
    fails the replica rather than serving without the auth the operator asked for."""
    if not env:
        return None
    key = os.environ.get(env) or None
    if key is None:
        raise RuntimeError(
            f"api_key_env: environment variable {env} is empty or not set on the Ingress replica; "
            "set it (runtime_env env_vars, a Kubernetes secret) or remove api_key_env"
        )
    return key
