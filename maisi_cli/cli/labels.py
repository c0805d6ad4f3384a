"""`maisi labels [QUERY]`: the label dictionary (ids and anatomy names, body = 200)."""

from __future__ import annotations

from typing import Optional

import typer

from maisi_cli.cli import render

HELP = "List the label ids and anatomy names, filtered by a name fragment or an id."


def matching_labels(query: str | None) -> list[tuple[int, str]]:
    """(id, name) sorted by id: all, those whose name contains `query` (case-insensitive), or the one id."""
    from maisi_cli.labels import label_dictionary

    entries = sorted((ident, name) for name, ident in label_dictionary().items())
    if query is None or not query.strip():
        return entries
    key = query.strip().lower()
    if key.isdigit():
        return [(ident, name) for ident, name in entries if ident == int(key)]
    return [(ident, name) for ident, name in entries if key in name.lower()]


def labels(
    ctx: typer.Context,
    query: Optional[str] = typer.Argument(None, metavar="QUERY",
                                          help="Part of an anatomy name (any case), or a label id."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    from maisi_cli.errors import MaisiError

    output = render.output_of(ctx.obj, json_flag)
    found = matching_labels(query)
    if not found:
        raise MaisiError(f"QUERY: no label matches '{query}'; run `maisi labels` without a query to list them all")
    if output.json:
        render.print_json({"labels": [{"id": ident, "name": name} for ident, name in found]})
        return
    render.print_table(None, ("id", "name"), found)
