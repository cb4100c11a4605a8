"""Pydantic validation errors in the words users read, one wording for experiment files, serve
args and HTTP request bodies: `where: problem` with `where` the path a user would type
(`tasks[0].data.train`, `inputs[1].text`) and, where there is one, the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

# Parts of a pydantic location that a user never types: FastAPI's request root, and the tags of
# the input union (a text is a `string` or an `object` with text/text_pair).
_NOT_TYPED = ("body", "string", "object")
_MAX_ECHO = 80  # characters of a bad value repeated back; HTTP inputs can be megabytes


def location(loc: Iterable[Any]) -> str:
    """('body', 'inputs', 0, 'object', 'text') → 'inputs[0].text'; ('optim', 'lr') → 'optim.lr'."""
    out = ""
    for part in loc:
        if part in _NOT_TYPED:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def error_lines(errors: Iterable[Mapping[str, Any]], model: type[BaseModel] | None = None) -> list[str]:
    """One `where: problem` line per pydantic error. With the validated `model`, an unknown key
    gets the closest known one and the list of known fields at that place."""
    lines = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        where = location(loc)
        problem = _problem(err, loc, model)
        lines.append(f"{where}: {problem}" if where else problem)
    return lines


def describe_errors(errors: Iterable[Mapping[str, Any]], model: type[BaseModel] | None = None) -> str:
    """`error_lines` as one line, joined by '; ' (HTTP error bodies, serve args)."""
    return "; ".join(error_lines(errors, model))


def _problem(err: Mapping[str, Any], loc: tuple[Any, ...], model: type[BaseModel] | None) -> str:
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1]) if model else None
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1) if loc else []
        hint = f"did you mean '{close[0]}'? " if close else ""
        fix = f"known fields: {', '.join(known)}" if known else "remove it (check the spelling)"
        return f"is not a known field; {hint}{fix}"
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return "must not be empty" if least <= 1 else f"needs at least {least} items"
    if kind == "string_type" and "string" in loc:
        return 'must be a string or an object {"text": "...", "text_pair": "..."}'
    msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
    if "input" in err and kind not in ("value_error", "assertion_error"):
        shown = repr(err["input"])
        shown = shown if len(shown) <= _MAX_ECHO else shown[: _MAX_ECHO - 1] + "…"
        msg = f"{msg} (got {shown})"
    return msg


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by walking `loc` down from `model`."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or part in _NOT_TYPED or current is None:
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None
