"""`maisi labels [QUERY]`: the label dictionary (ids and anatomy names, body = 200), or the one a model's spec
names (`--model`: a plugin's table, e.g. the CT-MR dictionary of the MR models)."""

from __future__ import annotations

from typing import Optional

import typer

from maisi_cli.cli import render

HELP = "List the label ids and anatomy names, filtered by a name fragment or an id."


def matching_labels(query: str | None, table: dict[str, int] | None = None) -> list[tuple[int, str]]:
    """(id, name) of `table` (default: maisi's dictionary) sorted by id: all, those whose name contains `query`
    (case-insensitive), or the one id."""
    from maisi_cli.labels import label_dictionary, maisi_name_for, normalised_name

    entries = sorted((ident, name) for name, ident in (label_dictionary() if table is None else table).items())
    if query is None or not query.strip():
        return entries
    key = normalised_name(query)
    if key.isdigit():
        return [(ident, name) for ident, name in entries if ident == int(key)]
    alias = maisi_name_for(query)  # a TotalSegmentator name (kidney_right) finds its MAISI label too
    return [(ident, name) for ident, name in entries if key in name.lower() or normalised_name(name) == alias]


def labels(
    ctx: typer.Context,
    query: Optional[str] = typer.Argument(None, metavar="QUERY",
                                          help="Part of an anatomy name (any case), or a label id."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Show how a segmenter's class ids map to MAISI's: "
                                         "totalsegmentator, vista3d, or a .json table (as generate --mask-labels)."),
    model: Optional[str] = typer.Option(None, "--model", help="Show the label dictionary this model's spec names "
                                        "(e.g. the CT-MR one of a plugin's MR models); default: MAISI's CT labels."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    from maisi_cli.errors import MaisiError, UsageError

    output = render.output_of(ctx.obj, json_flag)
    if scheme is not None:
        if model is not None:
            raise UsageError("--scheme: a scheme maps to MAISI's CT labels, not to a model's; drop --model or --scheme")
        show_scheme(scheme, query, output)
        return
    found = matching_labels(query, model_labels(model) if model is not None else None)
    if not found:
        raise MaisiError(f"QUERY: no label matches '{query}'; run `maisi labels` without a query to list them all")
    if output.json:
        render.print_json({"labels": [{"id": ident, "name": name} for ident, name in found]})
        return
    render.print_table(None, ("id", "name"), found)


def model_labels(name: str) -> dict[str, int]:
    """The label dictionary the spec of model `name` names (maisi's own when it names none)."""
    from maisi_cli.labels import label_dictionary_of
    from maisi_cli.models import get_model

    spec = get_model(name)
    return label_dictionary_of(spec.label_dictionary, spec.name)


def show_scheme(name: str, query: str | None, output: render.Output) -> None:
    """The scheme's classes (filtered by QUERY as the labels are) with the MAISI id and name each becomes."""
    from maisi_cli.errors import MaisiError
    from maisi_cli.label_schemes import label_scheme, maisi_names

    table = label_scheme(name, "--scheme")
    names = maisi_names()
    rows = [(ident, table.class_names.get(ident, ""), target, names.get(target, "") if target is not None else "")
            for ident, target in sorted(table.mapping.items())]
    key = (query or "").strip().lower()
    if key:
        rows = [r for r in rows if (key.isdigit() and int(key) == r[0]) or (not key.isdigit() and (
            key in r[1].lower() or key in r[3].lower()))]
    if not rows:
        raise MaisiError(f"QUERY: no class of {table.name} matches '{query}'; drop the query to list them all")
    if output.json:
        render.print_json({"scheme": table.name, "classes": [
            {"id": i, "name": n, "maisi_id": t, "maisi_name": m or None} for i, n, t, m in rows]})
        return
    render.print_table(f"{table.name} → MAISI", ("id", "name", "MAISI id", "MAISI name"),
                       [(i, n, "-" if t is None else t, m or "no counterpart (background)") for i, n, t, m in rows])
