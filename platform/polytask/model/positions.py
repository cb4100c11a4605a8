"""How many new tokens a decoder can produce: its position table, less the start token.

Torch-free, so the serve builder can check `max_new_tokens` against a bundle's heads from their
head.json alone, before any replica loads weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Relative-position decoders: the attention bias depends on key-query distance, no table.
RELATIVE = frozenset({"t5", "mt5", "umt5", "longt5"})


def position_limit(config: Any) -> int | None:
    """Most new tokens for a decoder config (object or dict): max_position_embeddings - 1 (the
    start token takes position 0), or None for relative-position decoders (T5)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("model_type", "") in RELATIVE:
        return None
    most = get("max_position_embeddings", None)
    return None if most is None else int(most) - 1


def bundle_position_limit(bundle: str | Path, task: str) -> int | None:
    """The position limit of a bundle's generation head `task` (None: none, or not generation)."""
    meta = json.loads((Path(bundle) / "heads" / task / "head.json").read_text())
    decoder = meta.get("decoder")
    return None if decoder is None else position_limit(decoder["config"])
