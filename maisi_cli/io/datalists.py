"""MONAI-style datalists: a JSON document {"training": [{"image": PATH, …}, …]} whose paths are relative to the
file's folder. Written by `maisi data phantoms` and `maisi data embed`, read by the trainers, `maisi data embed` and
`maisi fid`. No torch, no Typer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maisi_cli.errors import UsageError
from maisi_cli.io.documents import read_document
from maisi_cli.io.provenance import write_json

TRAINING_SHAPE = '{"training": [{"image": …}, …]}'
IMAGES_SHAPE = '{"training": [{"image": "…"}, …]} or a list of paths'


def write_datalist(path: Path, items: list[dict[str, Any]]) -> None:
    """`{"training": items}`, written atomically (paths in the items are the caller's, relative to `path`'s folder)."""
    write_json(path, {"training": items})


def read_datalist(path: Path, option: str = "--data", *,
                  empty_error: type[Exception] = UsageError) -> list[dict[str, Any]]:
    """The "training" items of a datalist, each with `image` made absolute (relative to the file's folder). A
    malformed file is a UsageError naming `option`; an empty training split raises `empty_error` (the caller's
    kind of error: nothing to train on is not a typo)."""
    items = read_document(path, option, kind="json", shape=TRAINING_SHAPE).get("training")
    if not isinstance(items, list):
        raise UsageError(f"{option}: '{path}' must hold {TRAINING_SHAPE}")
    if not items:
        raise empty_error(f"{option}: '{path}' has an empty training split; list at least one item under "
                          f"\"training\"")
    resolved = []
    for number, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise UsageError(f"{option}: '{path}' training item {number} has no \"image\" path")
        resolved.append({**item, "image": str((path.parent / item["image"]).resolve())})
    return resolved


def read_image_paths(path: Path, option: str, *, unreadable: type[Exception]) -> list[Path]:
    """The image paths of a datalist, more leniently: MONAI's {"training": [{"image": …}, …]}, or a plain list whose
    items are paths or {"image": …} objects; relative paths resolved against the file's folder, `~` expanded. A file
    that cannot be read raises `unreadable`; one that does not hold such a list is a UsageError."""
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise unreadable(f"{option}: cannot read '{path}' ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" (line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
        raise UsageError(f"{option}: '{path}' is not valid JSON{where}; give {IMAGES_SHAPE}") from None
    items = document.get("training") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise UsageError(f"{option}: '{path}' must hold {IMAGES_SHAPE}")
    paths = []
    for number, item in enumerate(items):
        image = item.get("image") if isinstance(item, dict) else item
        if not isinstance(image, str) or not image.strip():
            raise UsageError(f"{option}: '{path}' item {number} has no image path; give {IMAGES_SHAPE}")
        paths.append((path.parent / Path(image.strip()).expanduser()).resolve())
    return paths
