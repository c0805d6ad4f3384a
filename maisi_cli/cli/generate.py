"""`maisi generate`: parse, resolve, call the engine, render."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render
from maisi_cli.config import format_triple, parse_anatomy, parse_shard, parse_size, parse_spacing

HELP = ("Generate CT image + label pairs (NIfTI), conditioned on a label map: your --mask, one from the candidate "
        "database, or one generated with --anatomy NAME:SIZE. An image-only model (no ControlNet, e.g. the "
        "maisi-mr plugin's rflow-mr) writes images alone, with no mask options.")

JSON_OPTION = typer.Option(False, "--json", help="Print the run report as one JSON document.")


def generate(
    ctx: typer.Context,
    model: str = typer.Option("rflow-ct", "--model", "-m", help="Model name or alias (see `maisi models`), or a spec .json."),
    profile: str = typer.Option("auto", "--profile", "-p", help="auto, 16g, 24g, 32g, 80g, cpu, or a profile .toml."),
    size: Optional[str] = typer.Option(None, "--size", help="Output size in voxels, e.g. 512x512x128 (default: the model's)."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="Voxel spacing in mm, e.g. 0.8x0.8x2.5 (default: recommended for the size)."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", min=1, help="Number of image + label pairs."),
    seed: int = typer.Option(0, "--seed", min=0, help="Run seed; sample k's seed derives from (seed, k)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps (default: the model's)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Label map to condition on: a NIfTI file, or a folder "
                                        "of one binary file per class named by class (TotalSegmentator's default "
                                        "output). Without --size/--spacing the CT takes the mask's own grid (or "
                                        "the nearest the model allows)."),
    mask_labels: str = typer.Option("maisi", "--mask-labels", help="The ids of --mask: maisi, vista3d (MAISI's "
                                    "ids), totalsegmentator (v2 task total; see `maisi labels --scheme "
                                    "totalsegmentator`) or a .json table {\"<id>\": <MAISI id, name or null>}."),
    body_from: Optional[str] = typer.Option(None, "--body-from", help="Add the body label (200) that segmenters do "
                                            "not write: CT.nii.gz, the CT --mask was segmented from (the upstream "
                                            "envelope; tune it with `maisi data body`), or 'labels' (approximate, "
                                            "from the labels alone)."),
    anatomy: list[str] = typer.Option([], "--anatomy", help="NAME: anatomy the mask must hold; NAME:SIZE (SIZE in "
                                      "[0, 1], or -1 for absent): generate the mask with that organ/tumour size "
                                      "(repeatable; see `maisi labels`)."),
    body_region: list[str] = typer.Option([], "--body-region", help="head, chest, abdomen or pelvis (repeatable; "
                                          "ddpm models): filters the mask database and sets the region inputs."),
    mask_database: Optional[Path] = typer.Option(None, "--mask-database", help="Candidate-mask database JSON "
                                                 "(masks relative to its folder; see `maisi data masks index`). "
                                                 "Default: the model's released database."),
    allow_outside_database: bool = typer.Option(False, "--allow-outside-database", help="Read database entries "
                                                "that lie outside the mask folder (a '../' or absolute path, or a "
                                                "link out of it); refused without this."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Augment database masks (tumour moved in its "
                                 "organ, or a ±1 % zoom)."),
    mask_steps: Optional[int] = typer.Option(None, "--mask-steps", min=1, help="DDPM steps of the mask generator "
                                             "(default 1000)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Many masks in one run: a JSON list of cases "
                                            "{\"mask\": FILE, \"size\", \"spacing\", \"seed\", \"name\", "
                                            "\"mask_labels\", \"body_from\" (all but mask optional)}; case NAME "
                                            "(default: the mask's file name) is written into OUT/NAME as a run of its "
                                            "mask alone, its fields replacing the options. Paths are relative to the "
                                            "manifest; every mask is checked before the networks load once; --shard "
                                            "splits the cases' samples."),
    label_mode: str = typer.Option("full", "--label-mode", help="full: the whole mask; requested: only --anatomy labels."),
    out: Path = typer.Option(Path("maisi-out"), "--out", "-o", help="Output folder."),
    output_format: str = typer.Option("nifti", "--format", help="nifti (.nii.gz, with 3D Slicer and ITK-SNAP colour "
                                      "tables), nii (uncompressed), nrrd (image .nrrd, labels .seg.nrrd for 3D "
                                      "Slicer) or dicom (a CT series and a DICOM SEG; extra maisi\\[dicom])."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: write samples k with k mod N = I (default: SLURM array)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Regenerate samples that are already complete."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16 or bf16 (default: the profile's)."),
    backend: str = typer.Option("torch", "--backend", help="torch; onnx: onnxruntime (extra maisi\\[onnx]; graphs "
                                "exported on first use into MAISI_HOME); trt: TensorRT engines per size (extra "
                                "maisi\\[trt], a GPU)."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx-dir", help="With --backend onnx: the graphs of `maisi "
                                            "export onnx --out DIR` (checked against the weights' sha256)."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", envvar="MAISI_WEIGHTS_DIR",
                                               help="Folder holding weight files under their repository names."),
    allow_any_size: bool = typer.Option(False, "--allow-any-size", help="Lift the model's size/spacing rules (small CPU runs)."),
    qc: bool = typer.Option(True, "--qc/--no-qc", help="Check organ HU medians of each sample against the statistics "
                            "and re-generate a failing sample from the next seed."),
    strict_qc: bool = typer.Option(False, "--strict-qc", help="Exit 3 when a sample still fails the check after "
                                   "--max-attempts (its files are written all the same)."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts per sample while it fails the check."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="HU statistics JSON for the check (default: the "
                                         "packaged image_median_statistics.json)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale, on above 0 "
                                             "(0 = off; default: the model's): with a ControlNet, tumour presence "
                                             "(against the mask without its tumours); image-only, the modality."),
    levers: Optional[str] = typer.Option(None, "--levers", envvar="MAISI_LEVERS", help="GPU speed levers for this "
                                         "run, comma-separated: cudnn_benchmark, channels_last, compile, cuda_graphs, "
                                         "decode_overlap=F, decode_plan=planner; 'off' for none (default: the "
                                         "profile's [levers]; see docs/levers.md)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan and exit; before the weights "
                                 "are downloaded, it lists the files a run needs, with their sizes."),
    preview: bool = typer.Option(False, "--preview/--no-preview", help="Also write sample_NNNN_preview.png beside "
                                 "each pair: mid-planes, soft-tissue window, label contours (see `maisi preview`)."),
    qc_report: bool = typer.Option(False, "--report/--no-report", help="Also write sample_NNNN_qc.png beside each "
                                   "pair: each organ's HU against the training range, failing organs in red (see "
                                   "`maisi qc --report`)."),
    json_flag: bool = JSON_OPTION,
) -> None:
    from maisi_cli.engine.outputs import checked_format
    from maisi_cli.errors import UsageError
    from maisi_cli.request import GenerateRequest  # pydantic: not needed to build the command tree

    output = render.output_of(ctx.obj, json_flag)
    if label_mode not in ("full", "requested"):
        raise UsageError(f"--label-mode: '{label_mode}' is not a mode; use full or requested")
    if precision is not None and precision not in ("fp32", "fp16", "bf16"):
        raise UsageError(f"--precision: '{precision}' is not a precision; use fp32, fp16 or bf16")
    if backend not in ("torch", "onnx", "trt"):
        raise UsageError(f"--backend: '{backend}' is not a backend; use torch, onnx or trt")
    output_format = checked_format(output_format)
    if onnx_dir is not None and backend != "onnx":
        raise UsageError("--onnx-dir: only with --backend onnx; add --backend onnx or drop --onnx-dir")
    if strict_qc and not qc:
        raise UsageError("--strict-qc: needs the quality check; drop --no-qc")
    if qc_report and not qc:
        raise UsageError("--report: draws the quality check; drop --no-qc")
    if guidance is not None and not guidance >= 0:
        raise UsageError(f"--guidance: {guidance:g} is negative; use 0 (off) or a positive scale, e.g. 2")
    if levers is not None:
        import os

        from maisi_cli.levers import ENV, parse_levers

        parse_levers(levers, "--levers")  # one line naming --levers, exit 2
        previous = os.environ.get(ENV)
        os.environ[ENV] = levers  # the engine reads MAISI_LEVERS, else the profile's [levers]
        # for this command only (the Python API or a test runner goes on in this process)
        ctx.call_on_close(lambda: os.environ.pop(ENV, None) if previous is None else os.environ.update({ENV: previous}))
    names, sizes = parse_anatomy(anatomy)
    request = GenerateRequest(
        model=model, profile=profile,
        size=parse_size(size) if size else None,
        spacing=parse_spacing(spacing) if spacing else None,
        num_samples=num_samples, seed=seed, steps=steps, mask=mask, mask_labels=mask_labels, body_from=body_from,
        anatomy=names,
        anatomy_sizes=sizes,
        body_regions=tuple(body_region), mask_database=mask_database,
        allow_outside_database=allow_outside_database, augment=augment, mask_steps=mask_steps,
        label_mode=label_mode, out=out, output_format=output_format, shard=parse_shard(shard), overwrite=overwrite,
        device=device,
        precision=precision, allow_any_size=allow_any_size, weights_dir=weights_dir, guidance=guidance,
        backend=backend, onnx_dir=onnx_dir,
    )

    from maisi_cli.api import Generator
    from maisi_cli.engine.qc import QCOptions

    render.status(output, "planning the run…")  # torch and MONAI are in (the status said so until now)
    generator = Generator.for_request(request)
    qc_options = QCOptions(enabled=qc, strict=strict_qc, max_attempts=max_attempts, stats=stats)
    if manifest is not None:
        generate_manifest(generator, manifest, request, qc_options, output, dry_run=dry_run, preview=preview,
                          qc_report=qc_report)
        return
    plan = generator.plan_run(request, qc_options, dry_run=dry_run)
    if preview and plan.model.image_only:
        raise UsageError(f"model {plan.model.name} generates images only (no ControlNet): drop --preview (it "
                         "draws label contours on a CT window)")
    if qc_report and plan.model.image_only:
        raise UsageError(f"model {plan.model.name} generates images only (no organ quality check): drop --report")
    for message in plan.warnings:
        render.warning(message, output)
    if dry_run:
        show_plan(plan.describe(), output)
        return
    previews: list[str] = []
    reports: list[str] | None = [] if qc_report else None
    write_preview = preview_writer(previews, output, reports, preview)
    if preview or qc_report:  # complete samples skipped by this run: only a missing preview or report is written
        for task in plan.samples:
            if task.complete and task.image.is_file() and task.label.is_file():
                write_preview(task, missing_only=True)
    with render.progress(output, samples=len(plan.pending)) as on_progress:
        report = generator.run(plan, on_progress, on_warning=lambda message: render.warning(message, output),
                               on_written=write_preview if preview or qc_report else None)
    if output.json:
        render.print_json({**report.as_dict(), **({"previews": sorted(previews)} if preview else {}),
                           **({"reports": sorted(reports)} if reports is not None else {})})
    else:
        render.info(summary_line(report), output)
        if previews:
            render.info(f"{len(previews)} preview(s) written ({', '.join(sorted(previews))})", output)
        if reports:
            render.info(f"{len(reports)} QC report(s) written ({', '.join(sorted(reports))})", output)
    refuse_failures([(None, report)], strict_qc)


def preview_writer(previews: list[str], output: render.Output, reports: list[str] | None = None,
                   preview: bool = True):
    """`on_written` for --preview and --report: the sample's preview PNG, named in `previews`, and with `reports`
    its QC report PNG, named there; a failure is a warning (the sample itself is written)."""

    def write_preview(task, missing_only: bool = False) -> None:
        from maisi_cli.engine.preview import write_sample_preview
        from maisi_cli.engine.qc_report import write_sample_report
        from maisi_cli.errors import MaisiError

        for option, writer, names in (("--preview", write_sample_preview, previews if preview else None),
                                      ("--report", write_sample_report, reports)):
            if names is None:
                continue
            try:
                written = writer(task.image, task.label, missing_only=missing_only)
            except MaisiError as failure:
                render.warning(f"{option}: sample {task.index}: {failure}", output)
                continue
            if written is not None:
                names.append(written.name)

    return write_preview


def refuse_failures(reports: list, strict_qc: bool) -> None:
    """Exit 1 when a sample failed (the others are written), 3 with --strict-qc when one failed the check.
    `reports`: (case label or None, GenerationReport) pairs."""
    from maisi_cli.errors import GenerationError, QualityCheckFailed

    failed = [(case, s) for case, report in reports for s in report.samples if s.status == "failed"]
    if failed:
        named = ", ".join(f"{case}: {s.index}" if case else str(s.index) for case, s in failed)
        case, first = failed[0]
        raise GenerationError(f"sample(s) {named} failed ({case + ', ' if case else ''}sample {first.index}: "
                              f"{first.error}); the others are written; run the same command again to retry only "
                              "the missing samples")
    qc_failed = [(case, s) for case, report in reports for s in report.samples
                 if strict_qc and s.qc is not None and not s.qc["passed"]]
    if qc_failed:
        named = ", ".join((f"{case}: " if case else "") + (f"{s.index} ({len(s.attempts)} attempt(s))"
                                                           if s.attempts else str(s.index)) for case, s in qc_failed)
        raise QualityCheckFailed(f"--strict-qc: sample(s) {named} failed the quality check; their files are "
                                 "written and their sidecars hold the QC report")


def generate_manifest(generator, manifest: Path, request, qc_options, output: render.Output, *, dry_run: bool,
                      preview: bool, qc_report: bool = False) -> None:
    """`generate --manifest`: every case checked, then each run into OUT/NAME with the networks loaded once."""
    from maisi_cli.errors import UsageError

    if generator.spec.image_only:
        raise UsageError(f"--manifest: gives condition masks, and model {generator.spec.name} generates images "
                         "only (no ControlNet); drop --manifest")
    plan = generator.plan_manifest(manifest, request, qc_options, dry_run=dry_run)
    for message in plan.warnings:
        render.warning(message, output)
    if dry_run:
        if output.json:
            render.print_json({"dry_run": True, **plan.describe()})
        else:
            render.print_table(f"maisi generate --manifest {manifest} --dry-run",
                               ("case", "name", "size", "spacing (mm)", "seed", "samples", "out"),
                               [(c.number, c.name, format_triple(tuple(d["size"])),
                                 format_triple(tuple(d["spacing"])), d["seed"],
                                 ", ".join(f"{s['index']}:{s['status']}" for s in d["samples"]), d["out"])
                                for c, d in zip(plan.cases, plan.described)])
            downloads = plan.downloads()
            if downloads["downloads"]:
                render.print_table(None, ("", ""), download_rows(downloads["downloads"],
                                                                 downloads["download_command"]))
        return
    previews: list[str] = []
    qc_pngs: list[str] | None = [] if qc_report else None
    on_case = (lambda case, report: render.info(f"{case.label}: {summary_line(report)}", output)) \
        if not output.json else (lambda case, report: None)
    with render.progress(output, samples=plan.pending) as on_progress:
        reports = generator.run_manifest(plan, on_progress, on_warning=lambda message: render.warning(message, output),
                                         on_written=preview_writer(previews, output, qc_pngs, preview)
                                         if preview or qc_report else None,
                                         on_case=on_case)
    written = sum(len(r.report.indices("written")) for r in reports)
    skipped = sum(len(r.report.indices("skipped")) for r in reports)
    seconds = sum(r.report.seconds for r in reports)
    if output.json:
        render.print_json({"manifest": str(manifest), "out": str(request.out),
                           "cases": [r.as_dict() for r in reports], "written": written, "skipped": skipped,
                           "network_loads": generator.loads, "seconds": round(seconds, 3),
                           **({"previews": sorted(previews)} if preview else {}),
                           **({"reports": sorted(qc_pngs)} if qc_pngs is not None else {})})
    else:
        render.info(f"{len(reports)} case(s) from {manifest}: {written} sample(s) written, {skipped} already "
                    f"complete, into {request.out}/NAME ({seconds:.1f} s)", output)
    refuse_failures([(r.case.label, r.report) for r in reports], qc_options.strict)


def summary_line(report) -> str:
    """The run's one result line for a person."""
    written = sum(r.status == "written" for r in report.samples)
    skipped = sum(r.status == "skipped" for r in report.samples)
    plan = report.plan
    checked = [r for r in report.samples if r.qc is not None]
    quality = (f"; quality check: {len(checked) - len(report.qc_failed)} passed, {len(report.qc_failed)} failed"
               if checked else "")
    others = "".join(f", {len(report.indices(status))} {what}" for status, what in
                     (("locked", "locked by another job"), ("failed", "failed"))
                     if report.indices(status))
    return (f"{written} sample(s) written, {skipped} already complete{others}, to {plan['out']} "
            f"({plan['model']}, {format_triple(tuple(plan['size']))} at "
            f"{format_triple(tuple(plan['spacing']))} mm, {report.seconds:.1f} s){quality}")


def memory_text(memory: dict) -> str:
    text = (f"predicted GPU peak {memory['peak_gib']:.1f} GiB in fp16 ({memory['peak_stage']}; diffusion "
            f"{memory['diffusion_gib']:.1f}, decode {memory['decode_gib']:.1f})")
    if memory.get("budget_gib"):
        text += f", {'within' if memory['fits'] else 'OVER'} the profile's {memory['budget_gib']:g} GiB"
    return text


def host_memory_text(host: dict | None) -> str:
    if not host:
        return "not estimated"
    return f"predicted peak {host['peak_gib']:.1f} GiB ({host['peak_stage']}), checked against the free memory"


def show_plan(plan: dict, output: render.Output) -> None:
    if output.json:
        render.print_json({"dry_run": True, "plan": plan})
        return
    decode = plan["decode"]
    decode_text = (f"{decode['mode']}, ROI {format_triple(tuple(decode['roi']))} latent voxels, overlap "
                   f"{decode['overlap']:g}, {decode['windows']} window(s), TP splits {decode['tp_splits']} "
                   f"— {decode['rule']}")
    rows = [
        ("model", f"{plan['model']} ({plan['scheduler']}, {plan['model_source']})"),
        ("profile", plan["profile"]),
        ("device / precision", f"{plan['device']} / {plan['precision']}"
                               + (f" ({plan['backend']} backend)" if plan.get("backend", "torch") != "torch" else "")),
        ("size", f"{format_triple(tuple(plan['size']))} voxels at {format_triple(tuple(plan['spacing']))} mm"),
        ("latent", format_triple(tuple(plan["latent_shape"]))),
        ("steps", plan["steps"]),
        ("decode", decode_text),
        ("levers", ", ".join(plan.get("levers") or []) or "off (the reference numerics)"),
        ("memory", memory_text(plan["memory"])),
        ("host memory", host_memory_text(plan.get("host_memory"))),
        ("mask", ", ".join(f"{k}: {v}" for k, v in plan["mask"].items())),
        ("out", plan["out"]),
        ("samples", ", ".join(f"{s['index']}:{s['status']}" for s in plan["samples"]) or "none in this shard"),
        ("quality check", (f"on, up to {plan['qc']['max_attempts']} attempt(s), {plan['qc']['statistics']}"
                           + (", strict" if plan["qc"]["strict"] else "")) if plan["qc"]["enabled"]
         else plan["qc"].get("note") or "off"),
    ]
    if plan.get("image_only"):
        rows.insert(rows.index(("out", plan["out"])), (
            "image only", f"no label file; {plan['output_intensity']} intensities; guidance "
                          + (f"{plan['guidance']:g}" if plan.get("guidance") else "off")))
    rows += [(f"weights {component}", path) for component, path in plan["weights"].items()]
    rows += download_rows(plan.get("downloads") or [], plan.get("download_command"))
    render.print_table("maisi generate --dry-run", ("", ""), rows)


def download_rows(downloads: list[dict], command: str | None) -> list[tuple[str, str]]:
    """The dry run's rows for the files not downloaded yet: each with its size (or why it is unknown), then the
    total and the one command that fetches them."""
    from maisi_cli.engine.hub import decimal_size

    rows = [(f"to download: {d['component']}", f"{d['file']}, "
             + (decimal_size(d["size"]) if d["size"] is not None else f"size unknown ({d['size_source']})"))
            for d in downloads]
    if downloads:
        known = [d["size"] for d in downloads if d["size"] is not None]
        unknown = len(downloads) - len(known)
        total = (decimal_size(sum(known)) if known else "") + (
            f"{' + ' if known else ''}{unknown} file(s) of unknown size" if unknown else "")
        rows.append(("download", f"{len(downloads)} file(s), {total}: {command or 'put them under --weights-dir'}"))
    return rows
