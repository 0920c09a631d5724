"""``loads``: ``json.loads`` for files a run reads back, whose too-deep nesting is malformed JSON.

Python's JSON reader recurses once per nested array or object, so a file nested some thousand
levels deep (damaged, or made so) raises ``RecursionError`` from deep inside it, which every
reader's ``except ValueError`` lets through as a bare traceback. Here it is the
``json.JSONDecodeError`` any other malformed JSON raises, so the reader names the file.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads(text, **kwargs)``; nesting too deep to read is a ``json.JSONDecodeError``."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
        raise json.JSONDecodeError("nested too deeply to read", shown, 0) from None
