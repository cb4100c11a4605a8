"""The HTTP API of the Ingress: routes, request guards and JSON error bodies.

Bad input never reaches the model and never returns 500: auth, content type, body size, read
deadline and UTF-8 are checked before the body is parsed, each text before it joins a batch
(`serve.validation`); every rejection is `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from polytask.errors import describe_errors
from polytask.model.plan import request_tasks
from polytask.serve import errors
from polytask.serve.args import ServeArgs
from polytask.serve.schemas import (
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    StreamRequest,
    TaskPredictRequest,
    TaskPredictResponse,
    TasksResponse,
)
from polytask.serve.validation import (
    APIError,
    InputRejected,
    decode_lengths,
    prepare_inputs,
)
from polytask.tasks import TaskSpec


class IngressBackend(Protocol):
    """What the routes need from the Ingress replica (kept abstract so this module does not import
    `serve.ingress`, which imports it)."""

    specs: dict[str, TaskSpec]
    args: ServeArgs
    api_key: str | None
    encoder: Any
    metrics: Any  # polytask.serve.metrics.ServeMetrics

    async def run(
        self,
        inputs: list[tuple[str, str | None]],
        tasks: list[str],
        lengths: dict[str, tuple[int, int]] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]: ...

    def stream(
        self, item: tuple[str, str | None], task: str, lengths: tuple[int, int], sampling: Any = None
    ) -> AsyncIterator[dict[str, Any]]: ...

    def model_info(self, fingerprint: str | None = None) -> dict[str, Any]: ...

logger = logging.getLogger("ray.serve")


@dataclass
class RequestRecord:
    """What one HTTP request did; the routes and error handlers fill it in (through the ASGI scope),
    the middleware finishes it and hands it to the metrics and the request log."""

    method: str
    path: str
    tasks: list[str] = field(default_factory=list)
    inputs: int = 0
    status: int = 0
    reason: str | None = None  # the error code of a 4xx/5xx JSON body
    seconds: float = 0.0


SCOPE_KEY = "polytask.request"


def _record_of(request: Request) -> RequestRecord | None:
    return request.scope.get(SCOPE_KEY)


def _answer(request: Request, err: APIError) -> JSONResponse:
    """An error response whose code is noted for the request's metrics and log line."""
    record = _record_of(request)
    if record is not None:
        record.reason = err.code
    body = {"error": {"code": err.code, "message": err.message}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def log_request(record: RequestRecord) -> None:
    """One line per prediction request: Serve adds the request id, and drops the line unless its
    logging_config has `enable_access_log: true` (it is an access line); with `encoding: JSON`
    the `extra` fields are top-level JSON keys."""
    logger.info(
        "%s %s %s %s %.1fms",
        record.method,
        record.path,
        ",".join(record.tasks) or "-",
        record.status,
        record.seconds * 1000,
        extra={
            "serve_access_log": True,
            "polytask_tasks": record.tasks,
            "polytask_inputs": record.inputs,
            "polytask_status": record.status,
            "polytask_error": record.reason,
            "polytask_latency_ms": round(record.seconds * 1000, 3),
        },
    )

EXAMPLE = '{"inputs": ["the movie was great"], "tasks": ["sentiment"]}'


def _errors(method: str, path: str) -> dict[int | str, dict[str, Any]]:
    """The error responses a route documents: the codes of the steps it goes through."""
    return errors.responses(method, path, ErrorResponse)


# What answers without the API key when one is set: the liveness probe, which says nothing about
# the model or the replica.
OPEN_PATHS = frozenset({"/healthz"})

# An over-limit body is read and dropped up to this many bytes before the 413 goes out: a server
# that answers and closes while the client is still sending can reset the connection, and the
# client sees the reset instead of the 413.
DRAIN_BYTES = 64 * 1024 * 1024


class RequestGuard:
    """Pure ASGI middleware: API key, content type, body bytes, read deadline and UTF-8, then a
    JSON 500 catch-all."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        api_key: str | None,
        read_timeout_s: float = 10.0,
        on_request: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.read_timeout_s = read_timeout_s
        self.on_request = on_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.on_request is None or scope["method"] != "POST":
            await self._guarded(scope, receive, send)
            return
        began = time.perf_counter()
        record = scope[SCOPE_KEY] = RequestRecord(scope["method"], scope["path"])
        try:
            await self._guarded(scope, receive, send)
        finally:
            record.status = scope.get("polytask.status", 0) or 499  # 499: the client went away
            record.seconds = time.perf_counter() - began
            self.on_request(record)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                scope["polytask.status"] = message["status"]
            await send(message)

        try:
            headers = Headers(scope=scope)
            path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/"))
            if self.api_key and path not in OPEN_PATHS:  # /docs and the schema too
                self._check_key(headers)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    async with asyncio.timeout(self.read_timeout_s):
                        receive = await self._buffered(headers, receive)
                except TimeoutError:
                    raise APIError(
                        408,
                        "request_timeout",
                        f"the request body did not arrive within {self.read_timeout_s:g} s "
                        "(read_timeout_s); send the whole body at once",
                        {"Connection": "close"},
                    ) from None
            await self.app(scope, receive, tracking_send)
        except APIError as exc:
            if not started:
                await _answer(Request(scope), exc)(scope, receive, tracking_send)
        except Exception as exc:  # a real server fault: log it, answer JSON, keep the replica
            logger.exception("polytask ingress: unhandled error")
            if not started:
                await _answer(Request(scope), _internal(exc))(scope, receive, tracking_send)

    def _check_key(self, headers: Headers) -> None:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), self.api_key or b""):
            raise APIError(
                401,
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                {"WWW-Authenticate": "Bearer"},
            )

    async def _buffered(self, headers: Headers, receive: Receive) -> Receive:
        """Read the whole body (never more than the limit) and hand it on once UTF-8 checks out."""
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(
                415,
                "unsupported_media_type",
                f"content type '{ctype or '(none)'}' is not supported; send a JSON body with "
                "'Content-Type: application/json'",
            )
        limit = self.max_body_bytes
        declared = headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        chunks, size, more = [], 0, True
        while more and not too_large:
            message = await receive()
            if message["type"] != "http.request":
                raise APIError(400, "client_disconnected", "the client closed the request")
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            too_large = size > limit
            chunks.append(chunk)
        if too_large:
            if more:
                await _drain(receive, size)
            raise APIError(
                413,
                "body_too_large",
                f"request body is over {limit} bytes; send fewer or shorter inputs per request",
                {"Connection": "close"},
            )
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise APIError(
                400,
                "invalid_encoding",
                f"request body is not valid UTF-8 (bad byte at offset {exc.start}); encode the "
                "JSON as UTF-8",
            ) from None
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


async def _drain(receive: Receive, size: int) -> None:
    """Read and drop the rest of an over-limit body, up to DRAIN_BYTES (a larger one is cut off)."""
    while size <= DRAIN_BYTES:
        message = await receive()
        size += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _internal(exc: BaseException) -> APIError:
    from polytask.model.manifest import BundleError

    if isinstance(exc, BundleError):
        return APIError(500, "model_mismatch", f"the served model is inconsistent: {exc}")
    return APIError(
        500,
        "internal",
        f"internal error ({type(exc).__name__}); retry, and report it if it persists",
    )


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        why = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
        return _answer(
            request,
            APIError(
                400, "invalid_json", f"request body is not valid JSON ({why}); send e.g. {EXAMPLE}"
            ),
        )
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return _answer(
            request,
            APIError(422, "invalid_request", f"request body must be a JSON object like {EXAMPLE}"),
        )
    return _answer(request, APIError(422, "invalid_request", describe_errors(errors)))


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        err = APIError(404, "not_found", f"no route {request.url.path}; see /docs for the API")
    elif exc.status_code == 405:
        err = APIError(
            405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
        )
    elif exc.status_code == 400:  # FastAPI could not parse the body (e.g. JSON nested too deep)
        err = APIError(
            400, "invalid_json", f"request body could not be parsed ({exc.detail}); send e.g. {EXAMPLE}"
        )
    else:
        err = APIError(exc.status_code, f"http_{exc.status_code}", str(exc.detail))
    err.headers = dict(exc.headers or {}) or None
    return _answer(request, err)


def create_api(ingress: IngressBackend) -> FastAPI:
    """The FastAPI app of one Ingress replica: guards and error bodies, then each route group;
    routes close over the replica's handles and limits."""
    app = _guarded_app(ingress)
    calls = _ModelCalls(ingress)
    _info_routes(app, ingress, calls)
    _predict_routes(app, ingress, calls)
    _stream_routes(app, ingress, calls)
    return app


def _guarded_app(ingress: IngressBackend) -> FastAPI:
    """The bare app: `RequestGuard` (metrics and the request log line per request) and the
    handlers that turn every error into its JSON body."""

    def on_request(record: RequestRecord) -> None:
        # a task tag only for served tasks: a client must not be able to mint label values
        record.tasks = list(dict.fromkeys(t if t in ingress.specs else "unknown" for t in record.tasks))
        ingress.metrics.request(
            record.tasks, record.inputs, record.status, record.seconds, record.reason
        )
        log_request(record)

    app = FastAPI(
        title="polytask",
        description="Multi-task predictions: one shared encoder, one head per task. "
        "When an API key is configured, every route but /healthz (these docs included) needs "
        "'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
        docs_url="/docs",
    )
    app.add_middleware(
        RequestGuard,
        max_body_bytes=ingress.args.body_limit,
        api_key=ingress.api_key,
        read_timeout_s=ingress.args.read_timeout_s,
        on_request=on_request,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, _answer)
    return app


def answer_errors(exc: BaseException) -> APIError | None:
    """The API error a failed model call stands for (None: a server fault)."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return APIError(
            503, "overloaded", "the service is at capacity; retry shortly", {"Retry-After": "1"}
        )
    if isinstance(exc, InputRejected):
        return APIError(422, "invalid_text", f"inputs[{exc.index}]: {exc.reason}")
    return None


class _ModelCalls:
    """What every model route shares: the request deadline, and the model's refusals as API
    errors."""

    def __init__(self, ingress: IngressBackend) -> None:
        self.ingress = ingress
        self.deadline_s = ingress.args.request_timeout_s

    async def within_deadline(self, work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, self.deadline_s)
        except TimeoutError:
            raise APIError(
                504,
                "timeout",
                f"no answer within {self.deadline_s:g} s (request_timeout_s); retry, or send "
                "fewer inputs per request",
            ) from None

    async def run(
        self, request: Request, body: TaskPredictRequest, tasks: list[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One validated request through the Ingress, within its deadline."""
        ingress = self.ingress
        _note(request, tasks, len(body.inputs))
        inputs = prepare_inputs(ingress.specs, ingress.args, body.inputs, tasks)
        lengths = decode_lengths(
            ingress.specs, ingress.args, tasks, body.max_new_tokens, body.min_new_tokens
        )
        try:
            return await self.within_deadline(ingress.run(inputs, tasks, lengths, body.sampling()))
        except Exception as exc:
            err = answer_errors(exc)
            if err is None:
                raise
            raise err from None


def _note(request: Request, tasks: list[str], inputs: int) -> None:
    """The request's tasks and input count, for its metrics and log line."""
    record = _record_of(request)
    if record is not None:
        record.tasks, record.inputs = tasks, inputs


def _info_routes(app: FastAPI, ingress: IngressBackend, calls: _ModelCalls) -> None:
    """Liveness and the served tasks."""

    @app.get("/healthz", summary="Liveness (no API key needed, so it tells nothing else)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/tasks", response_model=TasksResponse, responses=_errors("get", "/v1/tasks"))
    async def list_tasks() -> dict[str, Any]:
        tasks = [
            {"name": s.name, "kind": s.kind, "labels": list(s.labels), "pair": s.pair}
            for s in ingress.specs.values()
        ]
        fingerprint = await calls.within_deadline(ingress.encoder.fingerprint.remote())
        return {"tasks": tasks, "model": ingress.model_info(fingerprint)}


def _predict_routes(app: FastAPI, ingress: IngressBackend, calls: _ModelCalls) -> None:
    """Predictions: several tasks (default: the plan's default rule), or one task."""

    @app.post(
        "/v1/predict",
        response_model=None,
        responses={200: {"model": PredictResponse}, **_errors("post", "/v1/predict")},
    )
    async def predict(request: Request, body: PredictRequest) -> JSONResponse:
        """Run the requested tasks (default: all) on every input."""
        tasks = request_tasks(ingress.specs, body.inputs, body.tasks)
        results, model = await calls.run(request, body, tasks)
        return JSONResponse({"results": results, "model": model})

    @app.post(
        "/v1/tasks/{task}/predict",
        response_model=None,
        responses={
            200: {"model": TaskPredictResponse}, **_errors("post", "/v1/tasks/{task}/predict")
        },
    )
    async def predict_task(request: Request, task: str, body: TaskPredictRequest) -> JSONResponse:
        """Run one task on every input."""
        results, model = await calls.run(request, body, [task])
        return JSONResponse({"task": task, "results": [r[task] for r in results], "model": model})


def _stream_routes(app: FastAPI, ingress: IngressBackend, calls: _ModelCalls) -> None:
    """One input of a generation task, its text streamed as server-sent events."""

    @app.post(
        "/v1/tasks/{task}/generate/stream",
        response_model=None,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "Server-sent events: `token` {id, text} per new token (text: the "
                "answer so far), then `done` {task, result, tokens, model}, or `error` {error}.",
            },
            **_errors("post", "/v1/tasks/{task}/generate/stream"),
        },
    )
    async def generate_stream(request: Request, task: str, body: StreamRequest) -> StreamingResponse:
        """Generate one input's text for a generation task, streamed as it is decoded."""
        _note(request, [task], 1)
        (item,) = prepare_inputs(ingress.specs, ingress.args, [body.input], [task])
        _check_streamable(ingress.specs[task])
        lengths = decode_lengths(
            ingress.specs, ingress.args, [task], body.max_new_tokens, body.min_new_tokens
        )[task]
        events = ingress.stream(item, task, lengths, body.sampling())
        deadline = asyncio.get_running_loop().time() + calls.deadline_s
        try:  # the first event before the 200: a refused input still gets its JSON 4xx
            first = await calls.within_deadline(anext(events))
        except BaseException as exc:
            await events.aclose()
            err = answer_errors(exc) if isinstance(exc, Exception) else None
            if err is None:
                raise
            raise err from None
        return StreamingResponse(
            _sse(task, first, events, deadline, calls.deadline_s, ingress),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _check_streamable(spec: TaskSpec) -> None:
    """Only a generation task decoding greedily or by sampling knows its text token by token."""
    if not spec.is_generation:
        raise APIError(
            422,
            "not_generation",
            f"task '{spec.name}' is a {spec.kind} task; only generation tasks stream: use "
            f"POST /v1/tasks/{spec.name}/predict",
        )
    if spec.generation.num_beams > 1:
        raise APIError(
            422,
            "not_streamable",
            f"task '{spec.name}' decodes with beam search (num_beams {spec.generation.num_beams}), "
            f"whose text is only known at the end: use POST /v1/tasks/{spec.name}/predict",
        )


def _event(name: str, data: dict[str, Any]) -> bytes:
    import json

    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse(
    task: str,
    first: dict[str, Any],
    events: AsyncIterator[dict[str, Any]],
    deadline: float,
    deadline_s: float,
    ingress: IngressBackend,
) -> AsyncIterator[bytes]:
    """The Decoder's events as server-sent events, within the request deadline. A client that
    goes away cancels this generator: the decode of its input stops (logged, and counted as a
    cancelled stream by the head)."""
    event: dict[str, Any] | None = first
    tokens = 0
    finished = False
    try:
        while event is not None:
            if "answer" in event:
                model = {**ingress.model_info(event["fingerprint"]), "ref": event["model"]}
                body = {"task": task, "result": event["answer"], "tokens": event["tokens"]}
                yield _event("done", {**body, "model": model})
                finished = True
                return
            tokens += 1
            yield _event("token", {"id": event["id"], "text": event["text"]})
            left = deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(left, 0.0)):
                    event = await anext(events, None)
            except TimeoutError:
                finished = True
                yield _event(
                    "error",
                    {
                        "error": {
                            "code": "timeout",
                            "message": f"no complete answer within {deadline_s:g} s "
                            "(request_timeout_s); ask for fewer max_new_tokens",
                        }
                    },
                )
                return
    except Exception as exc:  # noqa: BLE001 - the 200 is sent: the error goes in the stream
        finished = True
        err = answer_errors(exc) or _internal(exc)
        if err.status >= 500:
            logger.error("polytask stream %s failed: %s: %s", task, type(exc).__name__, exc)
        yield _event("error", {"error": {"code": err.code, "message": err.message}})
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        if not finished:
            logger.warning(
                "polytask stream %s: the client disconnected after %d token(s); its decode "
                "was cancelled",
                task,
                tokens,
            )
