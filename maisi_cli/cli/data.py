"""`maisi data …`: data preparation. `phantoms` writes synthetic CT phantoms with label maps and a datalist;
`masks index` builds a candidate-mask database from a folder of label maps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

app = typer.Typer(help="Prepare data: synthetic phantoms, candidate-mask databases.", no_args_is_help=True)
masks_app = typer.Typer(help="Candidate-mask databases.", no_args_is_help=True)
app.add_typer(masks_app, name="masks")


PHANTOMS_HELP = (
    "Write synthetic CT phantoms with label maps, and a datalist to train on.\n\n"
    "Each phantom is a torso (body 200) with lung lobes, liver, spleen, pancreas, kidneys, aorta, stomach, vertebrae "
    "and ribs in the label-dictionary ids; its CT in HU passes `maisi qc`. Files: OUT/phantom_0000_image.nii.gz "
    "(int16 HU) and OUT/phantom_0000_label.nii.gz (uint8), RAS at the requested spacing, and OUT/datalist.json "
    "(\"training\" entries: image, label, fold, spacing, dim, top/bottom_region_index; paths relative to OUT; "
    "fold = index mod 5).\n\n"
    "Phantom k depends on (seed, k) alone and complete phantoms are skipped on a re-run: --num 8 after --num 4 adds "
    "phantoms 4-7, and the datalist always lists all --num phantoms."
)


@app.command("phantoms", help=PHANTOMS_HELP)
def phantoms_command(
    ctx: typer.Context,
    num: int = typer.Option(8, "--num", "-n", help="Number of phantoms: phantom_0000 … (fold = index mod 5)."),
    size: str = typer.Option("128", "--size", help="Grid in voxels, e.g. 64, 128 or 256x256x128."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="Voxel spacing in mm, e.g. 3 or 1.5x1.5x2 "
                                          "(default: the phantom's 384 mm field of view / size)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created when missing)."),
    seed: int = typer.Option(0, "--seed", help="Run seed; phantom k's seed derives from (seed, k)."),
    tumours: bool = typer.Option(False, "--tumours/--no-tumours", help="Add a hepatic tumour (26) inside the liver "
                                 "and a lung tumour (23) inside a lobe."),
    json_flag: bool = typer.Option(False, "--json", help="Print a summary as one JSON document."),
) -> None:
    from maisi_cli.config import format_triple, parse_size, parse_spacing
    from maisi_cli.errors import UsageError

    output = render.output_of(ctx.obj, json_flag)
    if num < 1:
        raise UsageError(f"--num: {num} phantoms; give 1 or more")
    if seed < 0:
        raise UsageError(f"--seed: {seed} is negative; give a whole number 0 or more")
    grid_size = parse_size(size)
    from maisi_cli.engine.phantoms import default_spacing, write_phantoms
    from maisi_cli.io.files import writable_folder

    grid_spacing = parse_spacing(spacing) if spacing is not None else default_spacing(grid_size)
    writable_folder(out, "--out")
    with render.progress(output) as on_progress:
        run = write_phantoms(out, num, grid_size, grid_spacing, seed, tumours, on_progress)
    if output.json:
        render.print_json(run.as_dict())
    else:
        render.info(f"{num} phantom(s) of {format_triple(grid_size)} at {format_triple(grid_spacing)} mm in {out} "
                    f"({len(run.written)} written, {len(run.skipped)} already there); datalist {run.datalist}", output)


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

    from maisi_cli.io.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(entries, indent=1) + "\n").encode())


from maisi_cli.cli.train import embed_command  # noqa: E402  (`maisi data embed`; lives with the training commands)

app.command("embed")(embed_command)
