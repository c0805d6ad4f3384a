"""JSON sidecars and reports, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maisi_cli.io.files import write_atomic


def write_json(path: Path, document: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(document, indent=2, default=str) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
