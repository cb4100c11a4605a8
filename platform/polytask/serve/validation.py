"""Request validation at the Ingress: which tasks and how many inputs a request may name, and
the per-input text checks, all before the request joins a batch.

What a tokenizer could choke on is fixed or refused here, so it fails only its own request, with a
4xx naming the input (`inputs[3]`), and never reaches a batch shared with other requests.
Policy: lone UTF-16 surrogates are refused (they are not characters and cannot be encoded);
control characters (NUL, ESC, DEL, C1) become spaces, which keeps every character offset of an
NER span true; text with nothing visible (only spaces, zero-width or format characters) is refused.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from polytask.model.inputs import split_input
from polytask.serve.args import ServeArgs
from polytask.serve.schemas import PairInput
from polytask.tasks import TaskSpec

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ASCII_VISIBLE = re.compile("[!-~]")


class APIError(Exception):
    """A rejection with its HTTP status, stable code and a message that says what to change."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class InputRejected(ValueError):
    """Input `index` of one encode call cannot be encoded; the Ingress answers it as `inputs[i]`."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"input {index}: {reason}")
        self.index, self.reason = index, reason

    def __reduce__(self):  # keeps index and reason across Ray's pickling
        return (InputRejected, (self.index, self.reason))


class TextError(ValueError):
    """A text refused at the Ingress: `code` is the API error code, the message says the fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def clean_text(text: str, where: str) -> str:
    """`text` with control characters as spaces; TextError when it cannot or should not be encoded."""
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        raise TextError(
            "invalid_text",
            f"{where} holds a lone UTF-16 surrogate (\\u{ord(surrogate.group()):04x} at character "
            f"{surrogate.start()}), which is not a character; send valid Unicode (a character "
            "outside the BMP is escaped as a surrogate pair, e.g. \\ud83d\\ude00)",
        )
    text = _CONTROL.sub(" ", text)
    if not _ASCII_VISIBLE.search(text) and not any(map(_visible, text)):
        raise TextError(
            "empty_text",
            f"{where} has no visible characters (only spaces, control, zero-width or format "
            "characters); send some text",
        )
    return text


def _visible(char: str) -> bool:
    """Letters, digits, punctuation and symbols (incl. private use); not marks, spaces, formats."""
    return unicodedata.category(char)[0] in "LNPS" or unicodedata.category(char) == "Co"


def prepare_inputs(
    specs: dict[str, TaskSpec], args: ServeArgs, items: list[str | PairInput], tasks: list[str]
) -> list[tuple[str, str | None]]:
    """Check tasks and `args`' limits against the served model; cut over-long texts under
    `overflow: truncate`."""
    unknown = [t for t in tasks if t not in specs]
    if unknown:
        raise APIError(
            404,
            "unknown_task",
            f"unknown task(s) {', '.join(repr(t) for t in unknown)}; this model serves: "
            f"{', '.join(specs)}",
        )
    if len(items) > args.max_inputs_per_request:
        raise APIError(
            413,
            "too_many_inputs",
            f"{len(items)} inputs in one request; the limit is {args.max_inputs_per_request}: "
            "split them over several requests",
        )
    pair_tasks = [t for t in tasks if specs[t].pair]
    out = []
    for i, item in enumerate(items):
        text, pair = split_input(item)
        if pair is None and pair_tasks:
            raise APIError(
                422,
                "missing_text_pair",
                f"inputs[{i}] has no text_pair, but task(s) {', '.join(pair_tasks)} compare two "
                'texts: send {"text": "...", "text_pair": "..."}',
            )
        fitted_pair = None if pair is None else _fit(pair, f"inputs[{i}].text_pair", args)
        out.append((_fit(text, f"inputs[{i}]", args), fitted_pair))
    return out


def _fit(text: str, where: str, args: ServeArgs) -> str:
    """A checked text (`clean_text`), cut or refused when over the length limit."""
    try:
        text = clean_text(text, where)
    except TextError as exc:
        raise APIError(422, exc.code, str(exc)) from None
    limit = args.max_chars_per_input
    if len(text) <= limit:
        return text
    if args.overflow == "truncate":
        return text[:limit]
    raise APIError(
        413,
        "input_too_long",
        f"{where} has {len(text)} characters; the limit is {limit}: shorten it, or ask the "
        "operator for overflow: truncate",
    )


def decode_limit(spec: TaskSpec, args: ServeArgs) -> int:
    """Most new tokens one input may ask task `spec` for: the server's setting, else the task's."""
    own = spec.generation.max_new_tokens if spec.generation is not None else 1
    return args.max_new_tokens or own


def decode_lengths(
    specs: dict[str, TaskSpec],
    args: ServeArgs,
    tasks: list[str],
    max_new_tokens: int | None,
    min_new_tokens: int | None,
) -> dict[str, tuple[int, int]]:
    """(max_new_tokens, min_new_tokens) per requested generation task; a request over a task's
    limit is refused (422) naming the body field and the limit, before any model work."""
    out = {}
    for task in tasks:
        spec = specs[task]
        if not spec.is_generation:
            continue
        limit = decode_limit(spec, args)
        if max_new_tokens is not None and max_new_tokens > limit:
            raise APIError(
                422,
                "max_new_tokens_too_large",
                f"body.max_new_tokens: {max_new_tokens} is over the limit {limit} of task "
                f"'{task}'; ask for at most {limit} new tokens",
            )
        longest = max_new_tokens or min(spec.generation.max_new_tokens, limit)
        shortest = min_new_tokens or 0
        if shortest > longest:
            raise APIError(
                422,
                "min_new_tokens_too_large",
                f"body.min_new_tokens: {shortest} is over max_new_tokens {longest} of task "
                f"'{task}'; ask for at most {longest}",
            )
        out[task] = (longest, shortest)
    return out


def check_sampling(
    specs: dict[str, TaskSpec], tasks: list[str], sampling: dict[str, Any] | None
) -> dict[str, Any] | None:
    """`sampling` as asked; refused (422 naming the body field) for a beam-search task, which
    decodes deterministically."""
    if sampling is None:
        return None
    for task in tasks:
        spec = specs[task]
        if spec.is_generation and spec.generation.num_beams > 1:
            raise APIError(
                422,
                "sampling_with_beams",
                f"body.temperature: task '{task}' decodes with beam search (num_beams "
                f"{spec.generation.num_beams}); sampling applies to greedy tasks: leave temperature unset",
            )
    return sampling
