"""`maisi data …`: data preparation. `masks index` builds a candidate-mask database from a folder of label maps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

app = typer.Typer(help="Prepare data: candidate-mask databases.", no_args_is_help=True)
masks_app = typer.Typer(help="Candidate-mask databases.", no_args_is_help=True)
app.add_typer(masks_app, name="masks")


@masks_app.command("index")
def index_command(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder of NIfTI label maps in MAISI label ids (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Database JSON to write (default: "
                                       "FOLDER/candidate_masks.json); mask paths are relative to its folder."),
    json_flag: bool = typer.Option(False, "--json", help="Print a summary as one JSON document."),
) -> None:
    """Build a candidate-mask database (the reference's format) from a folder of label maps."""
    from maisi_cli.engine.masks.database import index_folder
    from maisi_cli.errors import UsageError

    output = render.output_of(ctx.obj, json_flag)
    if not folder.is_dir():
        raise UsageError(f"FOLDER: '{folder}' is not a folder of label maps")
    target = out or folder / "candidate_masks.json"
    with render.progress(output) as on_progress:
        entries = index_folder(folder, on_progress, base=target.parent)
    write_json_list(target, entries)
    summary = {"database": str(target), "entries": len(entries), "root": str(folder.resolve())}
    if output.json:
        render.print_json(summary)
    else:
        render.info(f"{len(entries)} label map(s) indexed into {target}", output)


def write_json_list(path: Path, entries: list[dict]) -> None:
    import json

    from maisi_cli.io.nifti import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(entries, indent=1) + "\n").encode())
