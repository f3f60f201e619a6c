"""Read a JSON file with an error that names the file and the line."""

from __future__ import annotations

import json
import os
from typing import Any


def load_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """Parse ``path``; a missing file or malformed JSON raises ``error`` naming ``path`` (and the line)."""
    if not os.path.isfile(path):
        raise error(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{e.lineno}: invalid JSON at line {e.lineno}: {e.msg}") from None
