"""Data files shipped inside the package: model specs, label dictionary, modality ids, HU statistics."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any


def resource_path(*parts: str) -> Path:
    return Path(str(resources.files("maisi_cli.resources").joinpath(*parts)))


@cache
def _resource_text(*parts: str) -> str:
    return resource_path(*parts).read_text()


def load_json(*parts: str) -> Any:
    """A packaged JSON file, parsed afresh for each caller (the text is read once): a caller that changes what it
    got cannot change what the next one reads."""
    return json.loads(_resource_text(*parts))
