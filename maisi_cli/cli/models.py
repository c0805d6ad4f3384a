"""`maisi models`: the models this installation knows, with the state of their weight files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

HELP = "List the models and whether their weight files are here."


def models(
    ctx: typer.Context,
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", envvar="MAISI_WEIGHTS_DIR",
                                               help="Folder holding weight files under their repository names."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    from maisi_cli.engine.weights import weight_status
    from maisi_cli.models import list_models

    output = render.output_of(ctx.obj, json_flag)
    entries = []
    for spec in list_models():
        status = weight_status(spec, weights_dir)
        entries.append({
            "name": spec.name,
            "aliases": list(spec.aliases),
            "description": spec.description,
            "scheduler": spec.scheduler_kind,
            "steps": spec.default_steps,
            "default_size": list(spec.default_size),
            "hf_repo": spec.hf_repo,
            "weights": [{"component": c, "file": f, "path": str(p) if p else None} for c, f, p in status],
        })
    if output.json:
        render.print_json({"models": entries})
        return
    rows = []
    for entry in entries:
        present = sum(w["path"] is not None for w in entry["weights"])
        rows.append((entry["name"], ", ".join(entry["aliases"]), entry["description"], entry["steps"],
                     f"{present}/{len(entry['weights'])} present"))
    render.print_table(None, ("model", "aliases", "what", "steps", "weights"), rows)
