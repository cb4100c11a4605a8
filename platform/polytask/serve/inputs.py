"""Per-input text checks at the Ingress, before a request joins a batch.

What a tokenizer could choke on is fixed or refused here, so it fails only its own request, with a
4xx naming the input (`inputs[3]`), and never reaches a batch shared with other requests.
Policy: lone UTF-16 surrogates are refused (they are not characters and cannot be encoded);
control characters (NUL, ESC, DEL, C1) become spaces, which keeps every character offset of an
NER span true; text with nothing visible (only spaces, zero-width or format characters) is refused.
"""

from __future__ import annotations

import re
import unicodedata

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ASCII_VISIBLE = re.compile("[!-~]")


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
