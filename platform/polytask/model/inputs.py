"""One input is a text or a text pair, in every layer: a str, a {"text", "text_pair"} mapping
(pyfunc, `polytask predict`), an object with `text`/`text_pair` (a data Record, a served
PairInput), or a validated (text, text_pair) tuple (the Ingress). Kept free of torch so the HTTP
layer can use it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def split_input(item: Any) -> tuple[str, str | None]:
    """(text, text_pair or None) of one input in any of the four forms."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, tuple):
        return item[0], item[1]
    if isinstance(item, Mapping):
        return item["text"], item.get("text_pair")
    return item.text, item.text_pair


def texts_and_pairs(items: Sequence[Any], pair: bool) -> tuple[list[str], list[str] | None]:
    """The two lists a tokenizer call takes: second texts only for a pair task (missing ones as
    ""), None otherwise, so a single-text task never sees a pair."""
    split = [split_input(item) for item in items]
    texts = [text for text, _ in split]
    return texts, ([p or "" for _, p in split] if pair else None)
