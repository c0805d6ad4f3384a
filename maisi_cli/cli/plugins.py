"""`maisi plugins`: the installed plugins, what each registers, and what went wrong."""

from __future__ import annotations

from collections.abc import Iterable

import typer

from maisi_cli import plugins
from maisi_cli.cli import render

HELP = ("List the installed plugins (entry points maisi.models, .modalities, .labels, .profiles, .commands, "
        ".extractors): version, what each registers, and any error. MAISI_LOAD_PLUGINS picks which load.")


def plugin_records(groups: Iterable[str] = plugins.GROUPS) -> list[plugins.PluginRecord]:
    """plugins.plugin_status with each registry built through its own module: plugins.py imports none of them (they
    import it). Imported here, when the command runs, so `maisi --help` stays light."""
    from maisi_cli.engine.hub import EXTRACTOR_FILES
    from maisi_cli.labels import label_dictionary, modality_mapping
    from maisi_cli.models import list_models
    from maisi_cli.profiles import list_profiles

    builders = {"models": list_models, "modalities": modality_mapping, "labels": label_dictionary,
                "profiles": list_profiles,
                "extractors": lambda: plugins.entry_points_named("extractors", EXTRACTOR_FILES)}
    return plugins.plugin_status(builders, groups)


def plugins_command(
    ctx: typer.Context,
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    output = render.output_of(ctx.obj, json_flag)
    records = plugin_records()
    selected = plugins.selected_names()
    if output.json:
        render.print_json({
            "load_plugins": None if selected is None else sorted(selected),
            "plugins": [record.as_dict() for record in records],
        })
        return
    if not records:
        render.info("no plugins installed (entry-point groups maisi.models, maisi.modalities, maisi.labels, "
                    "maisi.profiles, maisi.commands, maisi.extractors)", output)
        return
    rows = []
    for record in records:
        entry = record.as_dict()
        problem = entry["error"] or "; ".join(entry["refused"]) or ("not loaded (MAISI_LOAD_PLUGINS)"
                                                                     if record.skipped else "")
        names = record.registered
        shown = ", ".join(names[:4]) + (f" … ({len(names)} in all)" if len(names) > 4 else "")
        rows.append((record.plugin, record.version or "-", f"{entry['group']} {record.name}", shown or "-",
                     entry["status"], problem))
    render.print_table(None, ("plugin", "version", "entry point", "registers", "status", "problem"), rows)
