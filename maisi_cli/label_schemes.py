"""Label schemes of the masks users bring: which MAISI label id each of a segmenter's class ids stands for.

- `maisi`: MAISI's own ids (the default).
- `vista3d`: NV-Segment-CT / VISTA3D writes MAISI's ids too; named so a run records where its mask came from.
- `totalsegmentator`: TotalSegmentator v2, task "total" (117 classes, packaged table built from its published class
  map; every class has a MAISI counterpart of the same anatomy).
- a `.json` file: `{"<class id>": <MAISI id, a MAISI anatomy name, or null>}` for any other segmenter.

A class with no MAISI counterpart (null, or an id the table does not list) becomes background; the run names those
classes in one warning and in the sidecar. The body label 200, which no segmenter writes but maisi adds as the body
envelope, stays 200 unless a table maps it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from maisi_cli.errors import UsageError
from maisi_cli.labels import BODY_LABEL, label_dictionary
from maisi_cli.resources import load_json

BUILTIN_SCHEMES = ("maisi", "vista3d", "totalsegmentator")


@dataclass(frozen=True)
class LabelScheme:
    name: str  # a built-in scheme's name, or the .json file as given
    mapping: dict[int, int | None]  # class id → MAISI id (None: no counterpart); ids not listed have none either
    class_names: dict[int, str]  # class id → the segmenter's name for it
    identity: bool = False  # MAISI's own ids: nothing to convert


def maisi_names() -> dict[int, str]:
    return {ident: name for name, ident in label_dictionary().items()}


def _identity(name: str) -> LabelScheme:
    names = maisi_names()
    return LabelScheme(name, {ident: ident for ident in names}, names, identity=True)


def segmenter_scheme(name: str, mapping: dict[int, int | None], class_names: dict[int, str]) -> LabelScheme:
    """A segmenter's scheme, with the body label 200 (which no segmenter writes, but maisi adds as the body envelope,
    `--body-from`, `maisi data body`) passing through as itself unless the table maps it."""
    if BODY_LABEL not in mapping:
        mapping, class_names = {**mapping, BODY_LABEL: BODY_LABEL}, {**class_names, BODY_LABEL: "body"}
    return LabelScheme(name, mapping, class_names)


def _totalsegmentator() -> LabelScheme:
    classes = load_json("label_schemes", "totalsegmentator.json")["classes"]
    return segmenter_scheme("totalsegmentator", {int(c["id"]): c["maisi"] for c in classes},
                            {int(c["id"]): str(c["name"]) for c in classes})


def _from_file(path: Path, field: str) -> LabelScheme:
    """A user's table: class id → MAISI id, MAISI anatomy name, or null."""
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"{field}: cannot read '{path}' ({error.strerror}); give maisi, vista3d, "
                         "totalsegmentator or a readable .json table") from None
    except ValueError:
        raise UsageError(f"{field}: '{path}' is not JSON; write {{\"<class id>\": <MAISI id, name or null>}}") \
            from None
    if not isinstance(document, dict) or not document:
        raise UsageError(f"{field}: '{path}' must be an object {{\"<class id>\": <MAISI id, name or null>}}")
    names = maisi_names()
    by_name = {name.lower(): ident for ident, name in names.items()}
    mapping: dict[int, int | None] = {}
    for key, value in document.items():
        if not str(key).strip().isdigit() or not 0 <= int(key) <= 65535:
            raise UsageError(f"{field}: '{path}': key '{key}' is not a class id (a whole number)")
        if value is None:
            target = None
        elif isinstance(value, int) and not isinstance(value, bool) and value in names:
            target = value
        elif isinstance(value, str) and value.strip().lower() in by_name:
            target = by_name[value.strip().lower()]
        else:
            raise UsageError(f"{field}: '{path}': class {key} maps to {value!r}, which is not a MAISI label "
                             "id or name (see `maisi labels`); use null for a class with no counterpart")
        mapping[int(key)] = target
    return segmenter_scheme(str(path), mapping, {ident: f"class {ident}" for ident in mapping})


def label_scheme(name_or_path: str, field: str = "--mask-labels") -> LabelScheme:
    """A built-in scheme by name (any case), or a .json table; `field` names the option in errors."""
    key = name_or_path.strip().lower()
    if key in ("maisi", "vista3d"):
        return _identity(key)
    if key == "totalsegmentator":
        return _totalsegmentator()
    if key.endswith(".json"):
        return _from_file(Path(name_or_path).expanduser(), field)
    raise UsageError(f"{field}: '{name_or_path}' is not a label scheme; use {', '.join(BUILTIN_SCHEMES)} or "
                     "a .json table {\"<class id>\": <MAISI id, name or null>}")
