"""Plugins: other distributions add models, modalities, labels, profiles and commands through entry points.

Groups (each entry point's object):
- `maisi.models`: a callable returning a list of model specs, each a dict or the path of a spec .json (validated
  as `ModelSpec`, so the `_target_` allow-list holds); a plain list is accepted as well.
- `maisi.modalities`: a dict modality name → id (or a callable returning one).
- `maisi.labels`: a dict anatomy name → label id, 1..255 (or a callable returning one).
- `maisi.profiles`: a list of profile .toml paths or dicts (or a callable returning one).
- `maisi.commands`: a `typer.Typer`, mounted under the entry point's name with `add_typer`.
- `maisi.extractors`: a FID feature-extractor factory (engine/fid.py `ExtractorFactory`), under the name
  `maisi fid --extractor-name` takes; imported only when that name is asked for (`entry_points_named`).

A group is read only when something needs it (models when a model is listed or a name is not built in, profiles
when profiles are, commands when the app is assembled, extractors when `maisi fid` looks a name up), once per
process. `MAISI_LOAD_PLUGINS` names the plugins to
load (distribution or entry-point names, comma-separated); an empty value loads none; unset loads all.

A plugin never replaces anything built in: a name that is taken is refused. A plugin that fails to load is recorded.
Either gives one warning per plugin and process (`warnings_to` hands them to the CLI, which prints them), and the
rest keeps working. `plugin_status()` is what `maisi plugins` shows. No torch, rich or typer here, and no registry
(labels, models, profiles import this module; the CLI hands `plugin_status` what builds them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

GROUPS = ("models", "modalities", "labels", "profiles", "commands", "extractors")
IMPORTED_WHEN_USED = ("extractors",)  # listed without importing them; one is imported when its name is used
ENVIRONMENT = "MAISI_LOAD_PLUGINS"


@dataclass
class PluginRecord:
    """One entry point: where it comes from, what it registered, what was refused, why it failed."""

    plugin: str  # the distribution's name
    version: str | None
    group: str  # "models", "profiles", ...
    name: str  # the entry point's name
    value: str  # "module:attribute"
    registered: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "NAME (why)"
    error: str | None = None
    skipped: bool = False  # left out by MAISI_LOAD_PLUGINS

    def as_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "version": self.version, "group": f"maisi.{self.group}",
                "entry_point": self.name, "value": self.value, "registered": list(self.registered),
                "refused": list(self.refused), "error": self.error,
                "status": "skipped" if self.skipped else "error" if self.error else
                          "conflict" if self.refused else "ok"}


@dataclass
class _State:
    listed: dict[str, list[tuple[PluginRecord, metadata.EntryPoint]]] = field(default_factory=dict)  # let in
    discovered: dict[str, list[tuple[PluginRecord, Any]]] = field(default_factory=dict)  # group → loaded objects
    records: dict[str, list[PluginRecord]] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)  # group → the registry built from its plugins
    pending: list[str] = field(default_factory=list)  # warnings not yet handed to a sink
    warned: set[str] = field(default_factory=set)  # plugins that warned already
    sink: Callable[[str], None] | None = None


_state = _State()


def reset() -> None:
    """Forget every loaded plugin, built registry, warning and warning sink (tests; a new entry-point set)."""
    global _state
    _state = _State()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def selected_names() -> set[str] | None:
    """The plugin names `MAISI_LOAD_PLUGINS` lets in (normalised), or None when it is unset (all of them)."""
    value = os.environ.get(ENVIRONMENT)
    if value is None:
        return None
    return {_normal(part.strip()) for part in value.split(",") if part.strip()}


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    found = metadata.entry_points(group=f"maisi.{group}")
    unique: dict[tuple[str, str], metadata.EntryPoint] = {}
    for ep in found:  # the same distribution seen twice on sys.path (an editable and a normal install) counts once
        dist = ep.dist.name if ep.dist is not None else ep.value.split(":")[0].split(".")[0]
        unique.setdefault((_normal(dist), ep.name), ep)
    return sorted(unique.values(), key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:200] if text else type(error).__name__


def listed(group: str) -> list[tuple[PluginRecord, metadata.EntryPoint]]:
    """The group's entry points that MAISI_LOAD_PLUGINS lets in, none imported; every one is recorded (those left out
    as skipped), once per process."""
    if group in _state.listed:
        return _state.listed[group]
    wanted = selected_names()
    records: list[PluginRecord] = []
    let_in: list[tuple[PluginRecord, metadata.EntryPoint]] = []
    for ep in _entry_points(group):
        dist = ep.dist
        record = PluginRecord(plugin=dist.name if dist is not None else ep.value.split(":")[0],
                              version=dist.version if dist is not None else None,
                              group=group, name=ep.name, value=ep.value)
        records.append(record)
        if wanted is not None and _normal(record.plugin) not in wanted and _normal(ep.name) not in wanted:
            record.skipped = True
            continue
        let_in.append((record, ep))
    _state.records[group] = records
    _state.listed[group] = let_in
    return let_in


def loaded(group: str) -> list[tuple[PluginRecord, Any]]:
    """The group's entry points that MAISI_LOAD_PLUGINS lets in and that loaded, with their objects (once). Not for
    the groups imported when used (`entry_points_named`)."""
    if group in _state.discovered:
        return _state.discovered[group]
    objects: list[tuple[PluginRecord, Any]] = []
    for record, ep in listed(group):
        try:
            obj = ep.load()
            if group != "commands" and callable(obj):
                obj = obj()
        except Exception as error:  # a plugin's own bug: recorded, never raised
            fail(record, f"cannot load {ep.value}: {_describe(error)}")
            continue
        objects.append((record, obj))
    _state.discovered[group] = objects
    return objects


def entry_points_named(group: str, builtin: Iterable[str] = (),
                       on_builtin: Callable[[metadata.EntryPoint], None] | None = None) -> dict[str, Any]:
    """Name (lower case) → entry point, not imported, for a group whose plugins are imported one at a time when their
    name is used (maisi.extractors). A built-in name is refused (recorded; `on_builtin` words the warning); of two
    entry points with one name, the first is kept. Raises what importlib.metadata raises on broken metadata."""
    builtin = set(builtin)
    named: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for record, point in listed(group):
        name = point.name.strip().lower()
        if name in builtin or name in named:
            why = "maisi" if name in builtin else owner[name]
            _note(record.refused, f"{name} (the name is taken by {why})")
            if name in builtin and on_builtin is not None:
                on_builtin(point)
            continue
        named[name], owner[name] = point, f"plugin {record.plugin}"
        _note(record.registered, name)
    return named


def _note(entries: list[str], entry: str) -> None:
    if entry not in entries:  # the table is made again on each look-up
        entries.append(entry)


def registry(group: str, build: Callable[[list[tuple[PluginRecord, Any]]], Any]) -> Any:
    """What `build` makes of the group's loaded plugins, built once per process."""
    if group not in _state.built:
        _state.built[group] = build(loaded(group))
    return _state.built[group]


# --- outcomes -------------------------------------------------------------------------------------------------------
def fail(record: PluginRecord, error: str) -> None:
    """The entry point gave nothing usable: record it and warn once for its plugin."""
    if record.error is not None and error in record.error:  # the same failure seen again (the app assembled twice)
        return
    record.error = error if record.error is None else f"{record.error}; {error}"
    _warn(record, f"plugin {record.plugin}: maisi.{record.group} entry point '{record.name}' {error}; "
                  "it is left out (see `maisi plugins`)")


def refuse(record: PluginRecord, refusals: Iterable[tuple[str, str]]) -> None:
    """(name, why) pairs the plugin may not register (taken by maisi or another plugin, or invalid): record them
    and warn once."""
    refusals = list(refusals)
    if not refusals:
        return
    record.refused += [entry for entry in (f"{name} ({why})" for name, why in refusals) if entry not in record.refused]
    shown = "; ".join(f"{name!r}: {why}" for name, why in refusals[:5])
    more = f"; and {len(refusals) - 5} more" if len(refusals) > 5 else ""
    _warn(record, f"plugin {record.plugin}: maisi.{record.group} entry point '{record.name}' refused {shown}{more} "
                  "(a plugin overrides nothing; see `maisi plugins`)")


def _warn(record: PluginRecord, message: str) -> None:
    if record.plugin in _state.warned:
        return
    _state.warned.add(record.plugin)
    if _state.sink is not None:
        _state.sink(message)
    else:
        _state.pending.append(message)


def warnings_to(sink: Callable[[str], None] | None) -> None:
    """Hand plugin warnings to `sink` from now on, and the ones held so far at once (the CLI's stderr printer)."""
    _state.sink = sink
    if sink is not None:
        pending, _state.pending = _state.pending, []
        for message in pending:
            sink(message)


def pending_warnings() -> list[str]:
    return list(_state.pending)


def plugin_status(builders: Mapping[str, Callable[[], object]], groups: Iterable[str] = GROUPS) -> list[PluginRecord]:
    """Every entry point of every group with its outcome. A group is read now if no command needed it yet: through
    `builders[group]`, which builds its registry (what each plugin registered or had refused is recorded while it
    is built), else loaded (commands) or listed (the groups imported when used)."""
    out: list[PluginRecord] = []
    for group in groups:
        if group in builders:
            builders[group]()
        elif group in IMPORTED_WHEN_USED:
            listed(group)
        else:
            loaded(group)
        out += _state.records.get(group, [])
    return out


# --- helpers for the registries ------------------------------------------------------------------------------------
def as_list(record: PluginRecord, obj: Any, what: str) -> list[Any] | None:
    """The entry point's object as a list, or None after recording why it is not one."""
    if isinstance(obj, (list, tuple)):
        return list(obj)
    fail(record, f"gave a {type(obj).__name__}, not a list of {what}")
    return None


def merge_named(found: list, owner: dict[str, str], what: str, parse: Callable[[PluginRecord, Any], Any],
                keys_of: Callable[[Any], tuple[str, ...]], noun: str | None = None) -> dict[str, Any]:
    """The items plugins give in one group (each entry point's list through `parse`, which raises ValueError on a
    bad item), keyed by their first key. A key already in `owner` (maisi's names, then earlier plugins') refuses
    the item; `noun` words the refusal ("the profile name is taken by …"), else the taken keys are named."""
    added: dict[str, Any] = {}
    for record, obj in found:
        items = as_list(record, obj, what)
        if items is None:
            continue
        refusals: list[tuple[str, str]] = []
        for item in items:
            try:
                value = parse(record, item)
            except ValueError as error:
                fail(record, str(error))
                continue
            keys = keys_of(value)
            taken = [key for key in keys if key in owner]
            if taken:
                subject = f"the {noun} name" if noun else ", ".join(taken)
                refusals.append((keys[0], f"{subject} is taken by {owner[taken[0]]}"))
                continue
            for key in keys:
                owner[key] = f"plugin {record.plugin}"
            added[keys[0]] = value
            record.registered.append(keys[0])
        refuse(record, refusals)
    return added


def as_mapping(record: PluginRecord, obj: Any, what: str) -> dict[str, int] | None:
    """The entry point's object as {name: int id}, or None after recording why it is not one."""
    if not isinstance(obj, dict):
        fail(record, f"gave a {type(obj).__name__}, not a dict of {what}")
        return None
    bad = [k for k, v in obj.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        fail(record, f"gave non-integer ids for {', '.join(map(repr, bad[:3]))}")
        return None
    return dict(obj)


def merge_ids(table: dict[str, int], plugins: list[tuple[PluginRecord, Any]], what: str,
              id_range: tuple[int, int]) -> dict[str, int]:
    """Built-in `table` plus the plugins' name → id entries whose name (any case) and id are both free."""
    merged = dict(table)
    owner = {name.lower(): "maisi" for name in table}
    id_owner = {ident: "maisi" for ident in table.values()}
    low, high = id_range
    for record, obj in plugins:
        mapping = as_mapping(record, obj, f"{what} names to ids")
        if mapping is None:
            continue
        refusals: list[tuple[str, str]] = []
        for name, ident in mapping.items():
            key = name.strip().lower()
            if not key:
                refusals.append((name, "an empty name"))
            elif key in owner:
                refusals.append((name, f"the {what} name is taken by {owner[key]}"))
            elif not low <= ident <= high:
                refusals.append((name, f"{what} ids are {low}..{high}, not {ident}"))
            elif ident in id_owner:
                refusals.append((name, f"id {ident} is taken by {id_owner[ident]}"))
            else:
                merged[name] = ident
                owner[key] = f"plugin {record.plugin}"
                id_owner[ident] = f"plugin {record.plugin}"
                record.registered.append(name)
        refuse(record, refusals)
    return merged
