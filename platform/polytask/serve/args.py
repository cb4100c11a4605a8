"""The serve settings: the `args:` of `polytask.serve:build_app` (a Serve config's application
args) and the head deployment options, validated with errors that name each field and the fix.

Imports neither torch nor ray, so configs can be validated cheaply (tests, `polytask validate`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polytask.errors import describe_errors
from polytask.serve.colocated import Placement
from polytask.serve.levers import LeverName


class ServeArgsError(ValueError):
    """Application args that do not validate; the message names each field and the fix."""


class HeadOptions(BaseModel):
    """Deployment options applied to every head deployment with `.options(...)`."""

    model_config = ConfigDict(extra="forbid")

    ray_actor_options: dict[str, Any] | None = Field(
        None, description="e.g. {num_cpus: 0.5, resources: {cpu_pool: 0.01}}; never num_gpus."
    )
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Calls one head replica runs at once (Ingress batches, plus open "
        "streams for a generation head); unset: polytask's code default."
    )
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Calls queued per caller beyond those before Serve refuses more; "
        "-1 or unset: no limit."
    )
    num_replicas: int | None = Field(None, ge=1, description="Fixed count (no autoscaling).")
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="How long a stopping replica may finish its calls before Serve "
        "kills it; unset: Serve's default."
    )
    graceful_shutdown_wait_loop_s: float | None = Field(
        None, gt=0, description="How often a stopping replica checks whether its calls are done; "
        "unset: Serve's default."
    )
    placement: Placement = Field(
        "separate",
        description="separate: each head its own autoscaled deployment `head_<task>`; "
        "with_encoder: heads run inside the Encoder replica on its batch (no hop, no deployment). "
        "`head_placement` overrides it per task.",
    )

    @field_validator("ray_actor_options")
    @classmethod
    def _cpu_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("num_gpus"):
            raise ValueError(
                "heads run on CPU: remove num_gpus from head_options.ray_actor_options "
                "(only the Encoder deployment needs a GPU)"
            )
        return value

    def as_options(self) -> dict[str, Any]:
        """The Serve deployment options (placement is polytask's, not Serve's)."""
        return self.model_dump(exclude_none=True, exclude={"placement"})


class GenerationHeadOptions(HeadOptions):
    """Options for the heads of generation tasks only, applied after `head_options`: a decoder
    steps once per new token for its whole batch, so it may ask for a GPU (`num_gpus` > 0 makes it
    decode on cuda). `decode`, `max_rows`, `max_cached_tokens` and `threads` are polytask's
    (docs/generation.md, Serving)."""

    decode: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: rows join and leave the decode at every step; static: calls "
        "that arrive during a decode wait for the next one, which runs until its longest row ends.",
    )
    max_rows: int | None = Field(
        None, ge=1, le=4096, description="Rows one replica decodes at once (continuous); unset: 64."
    )
    max_cached_tokens: int | None = Field(
        None,
        ge=64,
        description="Tokens the rows of one replica may hold in their caches together, each row "
        "reserving its input's length plus its max_new_tokens (continuous); unset: 65536.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Torch threads of one Decoder replica (continuous); unset: half the "
        "replica machine's cores, so the Encoder keeps the rest.",
    )

    def decoding(self) -> dict[str, Any]:
        """What the Decoder replica reads: decode mode and its limits."""
        return self.model_dump(include={"decode", "max_rows", "max_cached_tokens", "threads"})

    def as_options(self) -> dict[str, Any]:
        return self.model_dump(
            exclude_none=True,
            exclude={"placement", "decode", "max_rows", "max_cached_tokens", "threads"},
        )

    @field_validator("ray_actor_options")
    @classmethod
    def _cpu_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return value


class ServeArgs(BaseModel):
    """Args of `polytask.serve:build_app` (the `args:` block of a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH or a bundle dir.",
    )
    tasks: list[str] | None = Field(None, min_length=1, description="Serve only these tasks.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the encoder runs.")
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Inputs per encoder forward pass (length-sorted)."
    )
    pass_overhead_tokens: float | None = Field(
        None,
        ge=0,
        description="A forward pass's fixed cost in padded tokens: the Encoder cuts a "
        "length-sorted batch into another pass where padding would cost more. Unset: each "
        "Encoder replica measures it when it loads the weights (tens of tokens on a CPU core; "
        "so large on a GPU that passes stay max_batch_size).",
    )
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        le=10,
        description="While another batch is running, how long an Ingress batch that is not full "
        "waits for more requests; a lone request never waits.",
    )
    ingress_batch_inputs: int = Field(
        256, ge=1, le=100_000, description="Most inputs one Ingress batch carries."
    )
    ingress_batches_in_flight: int = Field(
        2, ge=1, le=64, description="Batches one Ingress replica runs at once."
    )
    max_inputs_per_request: int = Field(
        64, ge=1, le=10_000, description="Most inputs one request may send; more: 413 too_many_inputs."
    )
    max_chars_per_input: int = Field(
        2000, ge=1, le=1_000_000,
        description="Longest text (and text_pair) in characters; longer: 413 input_too_long, or cut "
        "with overflow: truncate.",
    )
    max_body_bytes: int | None = Field(
        None, ge=1024, description="Request body limit; default fits the input limits."
    )
    overflow: Literal["reject", "truncate"] = Field(
        "reject", description="Inputs over max_chars_per_input: 413, or cut to the limit."
    )
    api_key_env: str | None = Field(
        None, min_length=1, description="Env var holding the API key; unset = no auth."
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="End-to-end deadline of one request once its body is read; past it: 504.",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Time a client has to send its whole body; a slower one gets 408.",
    )
    head_options: HeadOptions = Field(
        default_factory=HeadOptions,
        description="Serve deployment options of every head (a `deployments:` entry named "
        "head_<task> overrides them for one task).",
    )
    head_placement: dict[str, Placement] = Field(
        default_factory=dict,
        description="Per-task placement overriding head_options.placement, e.g. "
        "{sentiment: with_encoder, summarize: separate}.",
    )
    levers: list[LeverName] | None = Field(
        None,
        description="Ray Serve env levers this app needs (docs/serving.md, Throughput levers); "
        "`polytask serve` sets them before it starts Ray, a cluster must have them in its pods' "
        "env. Unset: polytask's defaults where `polytask serve` starts Ray, none required.",
    )
    generation_head_options: GenerationHeadOptions = Field(
        default_factory=GenerationHeadOptions,
        description="Applied after head_options to the heads of generation tasks only.",
    )
    decode_wait_s: float = Field(
        0.05,
        ge=0,
        le=10,
        description="A generation head's decode that starts right after another waits this long "
        "for the requests its just-answered clients send next, so they join it; a request "
        "reaching an idle head never waits.",
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Most new tokens a request may ask a generation task for (max_new_tokens in "
        "the body); unset: each task's own max_new_tokens from the bundle.",
    )
    cpu_variant: str | None = Field(
        None,
        description="With device cpu, serve this `polytask compress` variant of `model` (int8, "
        "pruned, pruned+int8) from the registry; device cuda always serves full precision.",
    )

    @field_validator("cpu_variant")
    @classmethod
    def _variant_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9]+(\+[a-z0-9]+)*", value):
            raise ValueError(
                f"'{value}' is not a variant name; use one `polytask compress` registers, "
                "e.g. int8, pruned or pruned+int8"
            )
        return value

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        """`serve run ... tasks=a,b` passes a string; accept it as a comma-separated list."""
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    def placement(self, task: str) -> str:
        """Where `task`'s head runs."""
        return self.head_placement.get(task, self.head_options.placement)

    @property
    def body_limit(self) -> int:
        """Bytes a request body may have: every input at its limit, JSON-escaped, plus slack."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_inputs_per_request * (2 * self.max_chars_per_input * 6 + 64) + 4096


def parse_args(args: dict[str, Any] | ServeArgs) -> ServeArgs:
    """Validate builder args; errors list each bad field with what to change."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(dict(args))
    except ValidationError as exc:
        raise ServeArgsError(
            "invalid polytask.serve args: "
            + describe_errors(exc.errors(), ServeArgs)
        ) from exc
