"""The HTTP request and response bodies of the Ingress (the OpenAPI schemas of `serve.http`).

Imports neither torch nor ray; the serve settings are `serve.args`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text must not be empty or whitespace-only; send some text")
    return value


Text = Annotated[StrictStr, AfterValidator(_not_blank)]


class PairInput(BaseModel):
    """One input as an object: `text_pair` is required by pair tasks, ignored by the others."""

    model_config = ConfigDict(extra="forbid")

    text: Text
    text_pair: Text | None = None


def _input_tag(value: Any) -> str:
    return "object" if isinstance(value, (dict, PairInput)) else "string"


Input = Annotated[
    Annotated[Text, Tag("string")] | Annotated[PairInput, Tag("object")],
    Discriminator(_input_tag),
]


class GenerationFields(BaseModel):
    """Per-request decoding lengths of generation tasks (other tasks ignore them)."""

    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="At most this many new tokens per input (default and limit: the task's "
        "max_new_tokens, or the server's max_new_tokens setting).",
    )
    min_new_tokens: int | None = Field(
        None,
        ge=0,
        description="No end-of-text before this many tokens (at most max_new_tokens).",
    )
    temperature: float | None = Field(
        None, ge=0, le=100, description="> 0: sample at this temperature; unset or 0: greedy."
    )
    top_p: float | None = Field(
        None, gt=0, le=1, description="Sampling: draw from the smallest set holding this much probability."
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Sampling: the row's random seed (the same text every time)."
    )

    def sampling(self) -> dict[str, Any] | None:
        """What the Decoder reads; None: greedy."""
        if not self.temperature:
            return None
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


class TaskPredictRequest(GenerationFields):
    """Body of POST /v1/tasks/{task}/predict."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Input] = Field(
        min_length=1,
        description='Strings, or {"text": ..., "text_pair": ...} objects (pair tasks).',
        examples=[["the movie was great", "alice flew to paris"]],
    )


class StreamRequest(GenerationFields):
    """Body of POST /v1/tasks/{task}/generate/stream: one input, its text streamed as decoded."""

    model_config = ConfigDict(extra="forbid")

    input: Input = Field(description='A string, or {"text": ..., "text_pair": ...}.')


class PredictRequest(TaskPredictRequest):
    """Body of POST /v1/predict."""

    tasks: list[StrictStr] | None = Field(
        None,
        min_length=1,
        description="Tasks to run. Omitted: every served task, pair tasks only when every "
        "input has a text_pair.",
    )


class ModelInfo(BaseModel):
    uri: str = Field(description="The model as configured (may name an alias).")
    ref: str = Field(description="The exact version served (alias resolved at deploy time).")
    variant: str = Field(
        "fp32", description="The encoder's weights: fp32, or the `polytask compress` variant "
        "served (int8, pruned, pruned+int8; `cpu_variant`)."
    )
    fingerprint: str | None = Field(None, description="Encoder weights id that answered.")


class PredictResponse(BaseModel):
    results: list[dict[str, dict[str, Any]]] = Field(
        description="One {task: answer} per input, in input order. Answers: classification "
        "{label, score, probabilities}; multilabel {labels, probabilities}; token_classification "
        "{entities: [{type, text, start, end, score}]}; regression {value}; generation {text}."
    )
    model: ModelInfo


class TaskPredictResponse(BaseModel):
    task: str
    results: list[dict[str, Any]] = Field(description="One answer per input, in input order.")
    model: ModelInfo


class TaskInfo(BaseModel):
    name: str
    kind: str
    labels: list[str]
    pair: bool = Field(description="Inputs need text_pair.")


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]
    model: ModelInfo


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code.")
    message: str = Field(description="What was wrong and what to change.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
