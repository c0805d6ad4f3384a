"""The label dictionary (132 anatomies of MAISI, plus body = 200) and anatomy-name lookup."""

from __future__ import annotations

from functools import cache

from maisi_cli.errors import UsageError
from maisi_cli.resources import load_json

BODY_LABEL = 200


@cache
def label_dictionary() -> dict[str, int]:
    """Anatomy name → label id, body included."""
    names = dict(load_json("label_dict.json"))
    names["body"] = BODY_LABEL
    return names


def label_id(name: str) -> int:
    """Look an anatomy up by name (case and surrounding space ignored)."""
    table = {key.lower(): value for key, value in label_dictionary().items()}
    key = name.strip().lower()
    if key not in table:
        close = [n for n in label_dictionary() if key and key in n.lower()][:5]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; `maisi labels` lists them"
        raise UsageError(f"--anatomy: '{name}' is not in the label dictionary{hint}")
    return table[key]


def modality_id(name: str) -> int:
    mapping = load_json("modality_mapping.json")
    if name not in mapping:
        raise UsageError(f"modality '{name}' is unknown; known: {', '.join(mapping)}")
    return int(mapping[name])
