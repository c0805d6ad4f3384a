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
def load_json(*parts: str) -> Any:
    return json.loads(resource_path(*parts).read_text())
