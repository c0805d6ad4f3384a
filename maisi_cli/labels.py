"""The label dictionary (132 anatomies of MAISI, plus body = 200), modality ids, and name lookup.

Plugins (`maisi.labels`, `maisi.modalities` entry points) add names; they never replace a built-in name or id.
A `maisi.labels` object may also hold whole label dictionaries of its own (an entry whose value is a table, name →
{anatomy: id}): a model spec's `label_dictionary` names one, and `maisi labels --model` shows it.
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


def _label_registries(found: list) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The `maisi.labels` plugins split in two: their name → id entries merged into the built-in dictionary, and
    the named tables (an entry whose value is a dict), each kept whole."""
    entries: list = []
    tables: dict[str, dict[str, int]] = {}
    for record, obj in found:
        if isinstance(obj, dict):
            for name, table in [(k, v) for k, v in obj.items() if isinstance(v, dict)]:
                _add_table(record, name, table, tables)
            obj = {k: v for k, v in obj.items() if not isinstance(v, dict)}
        entries.append((record, obj))
    return plugins.merge_ids(builtin_label_dictionary(), entries, "label", (1, 255)), tables


def _add_table(record: plugins.PluginRecord, name: str, table: dict, tables: dict[str, dict[str, int]]) -> None:
    key = name.strip().lower()
    mapping = plugins.as_mapping(record, table, f"label dictionary {name!r}: anatomy names to ids")
    if mapping is None:
        return
    if any(ident < 1 for ident in mapping.values()):  # 0 is the background of every label map
        plugins.fail(record, f"label dictionary {name!r} has ids below 1")
        return
    if key in tables:
        plugins.refuse(record, [(name, "the label dictionary name is taken by another plugin")])
        return
    tables[key] = mapping
    record.registered.append(f"label dictionary {key} ({len(mapping)} names)")


def label_dictionary() -> dict[str, int]:
    """Anatomy name → label id, body and plugin labels (ids 1..255: label maps are uint8) included."""
    return plugins.registry("labels", _label_registries)[0]


def named_label_dictionaries() -> dict[str, dict[str, int]]:
    """The label dictionaries plugins provide whole (lower-case name → {anatomy: id}), for a spec to name."""
    return plugins.registry("labels", _label_registries)[1]


def label_dictionary_of(name: str | None, model: str = "") -> dict[str, int]:
    """The dictionary a model's spec names by `label_dictionary`; None: the built-in one (plugin labels added)."""
    if name is None:
        return label_dictionary()
    tables = named_label_dictionaries()
    key = name.strip().lower()
    if key not in tables:
        known = ", ".join(sorted(tables)) or "none installed"
        raise UsageError(f"--model: model {model} names the label dictionary '{name}', which no plugin provides "
                         f"(known: {known}); install the plugin that ships it (`maisi plugins` lists them)")
    return tables[key]


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
