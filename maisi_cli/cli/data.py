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
    mask_labels: str = typer.Option("maisi", "--mask-labels", help="The ids of the maps: maisi, vista3d, "
                                    "totalsegmentator or a .json table (as `generate --mask-labels`); the database "
                                    "lists MAISI ids and `generate` converts each map as it reads it."),
    json_flag: bool = typer.Option(False, "--json", help="Print a summary as one JSON document."),
) -> None:
    """Build a candidate-mask database (the reference's format) from a folder of label maps."""
    from maisi_cli.engine.masks.database import index_folder
    from maisi_cli.errors import UsageError
    from maisi_cli.label_schemes import label_scheme
    from maisi_cli.labels import BODY_LABEL

    output = render.output_of(ctx.obj, json_flag)
    if not folder.is_dir():
        raise UsageError(f"FOLDER: '{folder}' is not a folder of label maps")
    if mask_labels.lower().endswith(".json"):  # the database may be read from another working folder
        mask_labels = str(Path(mask_labels).expanduser().resolve())
    scheme = label_scheme(mask_labels)
    target = out or folder / "candidate_masks.json"
    with render.progress(output) as on_progress:
        entries = index_folder(folder, on_progress, base=target.parent, scheme=scheme)
    write_json_list(target, entries)
    bodiless = [e["pseudo_label_filename"] for e in entries if BODY_LABEL not in e["label_list"]]
    summary = {"database": str(target), "entries": len(entries), "root": str(folder.resolve()),
               "mask_labels": scheme.name, "without_body": bodiless}
    if bodiless:
        render.warning(f"{len(bodiless)} of {len(entries)} map(s) have no body label (200), which the ControlNet "
                       f"needs (first: {bodiless[0]}); add it with `maisi data body MAP --ct CT --out MAP`", output)
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


BODY_HELP = (
    "Add the body envelope (label 200) to a label map: every voxel of the patient that no organ label claims.\n\n"
    "The released ControlNet expects it; segmenters (TotalSegmentator, NV-Segment-CT/VISTA3D) do not write it. With "
    "--ct (the CT the mask was segmented from, on the mask's grid), the upstream algorithm: the exterior air is the "
    "largest region below --hu-threshold, the body is the rest, and the scanner table is cut off (--bed-kernel, "
    "--table-fraction). Without --ct, an approximation from the labels alone (each axial slice's labelled outline "
    "plus --margin-mm of soft tissue), with a warning. Labelled voxels keep their label; the output is uint8 NIfTI "
    "with the mask's affine. A mask that already holds 200 is written as it is, unless --replace-body."
)


@app.command("body", help=BODY_HELP)
def body_command(
    ctx: typer.Context,
    mask: Path = typer.Argument(..., help="NIfTI label map (any class ids 0..255), e.g. a segmenter's output."),
    out: Path = typer.Option(..., "--out", "-o", help="Label map to write (.nii.gz or .nii)."),
    ct: Optional[Path] = typer.Option(None, "--ct", help="The CT (HU) the mask was segmented from, on its grid."),
    hu_threshold: float = typer.Option(-800.0, "--hu-threshold", help="HU below which a voxel is air."),
    closing_kernel: int = typer.Option(3, "--closing-kernel", help="Cube edge (odd voxels) of the air and body "
                                       "closings."),
    bed_kernel: int = typer.Option(5, "--bed-kernel", help="Cube edge (odd voxels) of the opening that cuts the "
                                   "table off the body."),
    table_fraction: float = typer.Option(0.05, "--table-fraction", help="An air pocket inside the body at least "
                                         "this fraction of the body's 200 voxels is table, and is dropped."),
    margin_mm: Optional[float] = typer.Option(None, "--margin-mm", help="Without --ct: soft tissue (mm) added "
                                              "around the labelled organs on each axial slice (default 20)."),
    replace_body: bool = typer.Option(False, "--replace-body", help="Drop the mask's own 200 and compute it again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out when it exists."),
    json_flag: bool = typer.Option(False, "--json", help="Print a summary as one JSON document."),
) -> None:
    from maisi_cli.engine.masks.body import (BODY_METHOD_NOTE, LABEL_ONLY_MARGIN_MM, BodyEnvelopeOptions,
                                             write_body_envelope)
    from maisi_cli.errors import UsageError

    output = render.output_of(ctx.obj, json_flag)
    options = BodyEnvelopeOptions(hu_threshold, closing_kernel, bed_kernel, table_fraction)
    problem = options.problem()
    if problem:
        raise UsageError(f"{problem[0]}: {problem[1]}")
    if margin_mm is not None and ct is not None:
        raise UsageError("--margin-mm: it sizes the label-only method, used without --ct; drop one of them")
    if margin_mm is not None and not margin_mm >= 0:
        raise UsageError(f"--margin-mm: {margin_mm:g} mm; give 0 or more millimetres")
    if not out.name.endswith((".nii.gz", ".nii")):
        raise UsageError(f"--out: '{out}' is not a NIfTI file name; end it in .nii.gz or .nii")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UsageError(f"--out: '{out}' exists; choose another --out, or add --overwrite to replace it")
    margin = LABEL_ONLY_MARGIN_MM if margin_mm is None else margin_mm
    run = write_body_envelope(mask, out, ct, options, margin, replace_body)
    if run.method == "labels":
        render.warning(BODY_METHOD_NOTE, output)
    if run.method == "kept":
        render.warning(f"MASK: '{mask}' already holds the body label 200 ({run.body_voxels} voxels); written as it "
                       "is (add --replace-body to compute it again)", output)
    if output.json:
        render.print_json(run.as_dict())
    else:
        how = {"ct": f"from the CT {ct}", "labels": "from the labels alone", "kept": "(the mask's own body kept)"}
        render.info(f"{run.added} body voxel(s) (200) added {how[run.method]}; {out} written", output)


from maisi_cli.cli.nnunet import NNUNET_HELP, nnunet_command  # noqa: E402  (`maisi data nnunet`)

app.command("nnunet", help=NNUNET_HELP)(nnunet_command)
