"""The label dictionary (132 anatomies of MAISI, plus body = 200), modality ids, and name lookup.

Plugins (`maisi.labels`, `maisi.modalities` entry points) add names; they never replace a built-in name or id.
"""

from __future__ import annotations

from functools import cache

from maisi_cli import plugins
from maisi_cli.errors import UsageError
from maisi_cli.resources import load_json

BODY_LABEL = 200


@cache
def builtin_label_dictionary() -> dict[str, int]:
    """The packaged anatomy name → label id table, body included."""
    names = dict(load_json("label_dict.json"))
    names["body"] = BODY_LABEL
    return names


def label_dictionary() -> dict[str, int]:
    """Anatomy name → label id, body and plugin labels (ids 1..255: label maps are uint8) included."""
    return plugins.registry("labels", lambda found: plugins.merge_ids(builtin_label_dictionary(), found, "label",
                                                                      (1, 255)))


def modality_mapping() -> dict[str, int]:
    """Modality name → the id the networks take as class label (0..127), plugin modalities included."""
    builtin = {name: int(ident) for name, ident in load_json("modality_mapping.json").items()}
    return plugins.registry("modalities", lambda found: plugins.merge_ids(builtin, found, "modality", (0, 127)))


def normalised_name(name: str) -> str:
    """An anatomy name as looked up: any case, underscores as spaces (`hepatic_tumor`), single spaces."""
    return " ".join(name.strip().lower().replace("_", " ").split())


@cache
def segmenter_aliases() -> dict[str, str]:
    """TotalSegmentator's class names (`kidney_right`) → the MAISI name of the same anatomy (`right kidney`), from
    the packaged table (maisi_cli/label_schemes.py)."""
    names = {ident: name for name, ident in builtin_label_dictionary().items()}
    classes = load_json("label_schemes", "totalsegmentator.json")["classes"]
    return {normalised_name(c["name"]): names[c["maisi"]] for c in classes if c["maisi"] in names}


def maisi_name_for(name: str) -> str:
    """The normalised MAISI name a user's anatomy name stands for (itself, or a TotalSegmentator alias's)."""
    key = normalised_name(name)
    return normalised_name(segmenter_aliases().get(key, key))


def label_id(name: str) -> int:
    """Look an anatomy up by name: any case, underscores for spaces, or TotalSegmentator's name for it."""
    table = {normalised_name(key): value for key, value in label_dictionary().items()}
    key = normalised_name(name)
    key = key if key in table else maisi_name_for(name)
    if key not in table:
        close = [n for n in label_dictionary() if key and key in n.lower()][:5]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; `maisi labels` lists them"
        raise UsageError(f"--anatomy: '{name}' is not in the label dictionary{hint}")
    return table[key]


def modality_id(name: str) -> int:
    mapping = modality_mapping()
    if name not in mapping:
        raise UsageError(f"modality '{name}' is unknown; known: {', '.join(mapping)}")
    return int(mapping[name])
