"""A folder holds one run: the settings that change an output's bytes are recorded in `OUT/maisi-run.json`, and a
sample counts as complete only when its files are the ones its sidecar describes.

Without this, a re-run into a folder with other settings (another size, seed or step count) would skip the samples
already there and report "complete" for files made another way; a truncated image beside its sidecar would count as
complete too. Shards of one job write the same record, so they agree; a run that differs stops (exit 2) before
anything is written, naming the first differing setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from maisi_cli.config import format_triple
from maisi_cli.engine.locks import sample_lock_path
from maisi_cli.engine.outputs import first_changed_file
from maisi_cli.engine.plan import GenerationPlan, SampleTask, plan_samples
from maisi_cli.engine.qc import QCOptions
from maisi_cli.errors import OutputError, UsageError
from maisi_cli.levers import plan_levers
from maisi_cli.io.files import check_replaceable, create_once, opened_regular, sha256_of_input, write_atomic
from maisi_cli.request import GenerateRequest

RECORD_NAME = "maisi-run.json"


def canonical_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def mask_identity(plan: GenerationPlan) -> dict[str, Any]:
    """Where the condition masks come from, by content where it is a file the user gave."""
    request = plan.request
    if plan.model.image_only:
        return {"source": "none"}
    if request.anatomy_sizes:
        return {"source": "generated", "sizes": [list(pair) for pair in request.anatomy_sizes],
                "mask_steps": request.mask_steps}
    if plan.mask_source.kind in ("file", "array"):  # a file, or a label map given to the Python API
        identity = {"source": plan.mask_source.kind, "sha256": plan.mask_source.content_sha256()}
        if request.mask_labels != "maisi":  # recorded only when given: folders of earlier runs keep their digest
            identity["labels"] = scheme_identity(request.mask_labels)
        if plan.mask_source.body is not None:  # --body-from: the CT by content, the method and its parameters
            identity["body"] = {k: v for k, v in plan.mask_source.body_record().items() if k != "ct"}
        return identity
    database = request.mask_database
    return {"source": "database", "database": str(Path(database).expanduser().resolve()) if database else "model's",
            "augment": request.augment, "body_regions": list(request.body_regions)}


def scheme_identity(name: str) -> str:
    """A built-in scheme by name; a .json table by its content."""
    path = Path(name).expanduser()
    return f"table {sha256_of_input(path)}" if name.lower().endswith(".json") and path.is_file() else name.lower()


def run_settings(plan: GenerationPlan) -> dict[str, Any]:
    """The plan's settings that change the bytes of an output, keyed by the option that sets each (in the order a
    difference is reported). The weights' sha256 is added once the files are read (`record_weights`)."""
    request, model = plan.request, plan.model
    qc = plan.qc_statistics
    return {
        "--model": model.name,
        "model spec": canonical_sha256({"network": model.network, "weights": model.weights,
                                        "output_intensity": model.output_intensity, "modality": model.modality}),
        "--size": format_triple(tuple(plan.size)),
        "--spacing": format_triple(tuple(float(s) for s in plan.spacing)),
        "--seed": request.seed,
        "--steps": plan.steps,
        "mask source (--mask, --mask-database, --anatomy NAME:SIZE)": mask_identity(plan),
        "--anatomy": list(request.anatomy),
        "--label-mode": None if model.image_only else request.label_mode,
        "--guidance": plan.guidance,
        "--precision": plan.precision,
        "--backend": request.backend,
        "--device (kind)": plan.device.split(":")[0],
        "decode plan (from --profile)": {"mode": plan.decode.mode, "roi": list(plan.decode.roi),
                                         "overlap": plan.decode.overlap},
        "quality check (--qc, --max-attempts, --stats)": (
            {"max_attempts": plan.qc.max_attempts, "statistics": canonical_sha256(qc.as_dict())}
            if qc is not None else None),
        # recorded only when given, so the folders of earlier (NIfTI) runs keep their digest
        **({"--format": request.output_format} if request.output_format != "nifti" else {}),
        # compiled networks and another decode overlap change the voxels a little; recorded only when one is on
        **({"levers (--levers, the profile's [levers])": levers.on()} if (levers := plan_levers(plan)).any_on else {}),
    }


def settings_sha256(plan: GenerationPlan) -> str:
    """One digest of `run_settings`: each sidecar carries it, so a sample of another run never counts complete."""
    return canonical_sha256(run_settings(plan))


def pair_settings_sha256(plan: GenerationPlan) -> str:
    """The digest of the settings that make the pair's voxels, whatever the format they are written in: DICOM UIDs
    derive from it, so `generate --format dicom` and `maisi convert --format dicom` write the same series."""
    return canonical_sha256({k: v for k, v in run_settings(plan).items() if k != "--format"})


def record_path(out: Path) -> Path:
    return Path(out) / RECORD_NAME


def read_record(out: Path) -> dict[str, Any] | None:
    """The folder's record, or None when it has none. A record that is a link, not a file or not JSON is refused:
    the folder's state cannot be known."""
    path = record_path(out)
    text = read_regular_text(path)
    if text is None:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("settings"), dict):
        raise OutputError(f"--out: {path} is not a maisi run record (unreadable); remove it, or choose another --out")
    return document


def read_regular_text(path: Path) -> str | None:
    """A regular file's text, read without following a link; None when absent; OutputError for anything else."""
    try:
        with opened_regular(path) as handle:
            return handle.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):  # no folder yet: no record (the write check speaks later)
        return None
    except OSError as error:
        raise OutputError(f"--out: cannot read {path} ({error.strerror}); remove it, or choose another --out") from None


def shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "none" if value is None else str(value)


def first_difference(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    for key, value in current.items():
        if key in recorded and json.loads(json.dumps(recorded[key], default=str)) != json.loads(
                json.dumps(value, default=str)):
            return key, recorded[key], value
    return None


def different_run_error(out: Path, key: str, recorded: Any, current: Any) -> UsageError:
    return UsageError(f"--out: {out} holds a run made with {key} {shown(recorded)}, and this run has {key} "
                      f"{shown(current)}; choose another --out, or add --overwrite to replace that run's samples")


def refuse_if_different(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's record (None when it has none), refused (exit 2) when a setting it holds differs."""
    record = read_record(out)
    if record is not None:
        difference = first_difference(record["settings"], settings)
        if difference is not None:
            raise different_run_error(out, *difference)
    return record


def check_record(plan: GenerationPlan) -> None:
    """Refuse (exit 2) a run whose settings differ from those recorded in its folder, unless --overwrite."""
    if not plan.request.overwrite:
        refuse_if_different(plan.request.out, run_settings(plan))


def record_weights(plan: GenerationPlan, weight_hashes: dict[str, dict[str, str]]) -> None:
    """Once the weights are read: refuse a run whose weights differ from the recorded ones (unless --overwrite),
    then write the folder's record if it has none (or --overwrite replaces it). Shards of one job race to create it
    with the same content: one makes it, the others compare with it."""
    out = Path(plan.request.out)
    settings = {**run_settings(plan),
                "weights sha256": {component: entry["sha256"] for component, entry in sorted(weight_hashes.items())}}
    document = {"about": "the settings of the run this folder holds (maisi generate); a re-run must match them",
                "settings": settings}
    payload = (json.dumps(document, indent=2, default=str) + "\n").encode()
    if plan.request.overwrite:
        write_atomic(record_path(out), payload)
        return
    if refuse_if_different(out, settings) is None and not create_once(record_path(out), payload):
        refuse_if_different(out, settings)  # another shard made it first


def sample_problem(task: SampleTask, digest: str) -> str | None:
    """Why a sample whose files all exist is not complete for this run, or None when it is: its sidecar must be
    readable, come from a run with these settings, and record the sha256 of the image and label as they are now."""
    try:
        text = read_regular_text(task.sidecar)
        document = json.loads(text) if text is not None else None
    except (OutputError, ValueError):
        document = None
    if not isinstance(document, dict):
        return f"its sidecar {task.sidecar.name} is unreadable"
    if document.get("run_settings_sha256") != digest:
        return f"its sidecar {task.sidecar.name} was written by a run with other settings"
    recorded = document.get("files_sha256")
    if not isinstance(recorded, dict):
        return f"its sidecar {task.sidecar.name} records no sha256 of its files"
    changed = first_changed_file(((path, recorded.get(role)) for role, path in (("image", task.image),
                                                                               ("label", task.label))
                                  if path is not None))
    if changed is not None:
        return f"{changed.name} does not match the sha256 its sidecar records (changed or truncated)"
    return None


def verified_samples(plan: GenerationPlan, on_warning: Callable[[str], None]) -> list[SampleTask]:
    """The plan's samples with `complete` true only for samples whose files match their sidecar; each sample that
    looked complete but is not is named in a warning, and will be made again."""
    digest = settings_sha256(plan)
    tasks = []
    for task in plan.samples:
        if task.complete:
            problem = sample_problem(task, digest)
            if problem is not None:
                on_warning(f"sample {task.index}: {problem}; it will be generated again")
                task = replace(task, complete=False)
        tasks.append(task)
    return tasks


# --- the plan of a run into a folder -------------------------------------------------------------------------------
def with_completion(tasks: list[SampleTask], overwrite: bool) -> list[SampleTask]:
    """A sample is complete when its sidecar (written last) and its images exist (the image alone for an image-only
    model: it has no label file), unless --overwrite makes it again."""
    return [replace(task, complete=not overwrite and task.files_exist()) for task in tasks]


def plan_generation(request: GenerateRequest, qc: QCOptions | None = None,
                    keep: Callable[[SampleTask], bool] | None = None, dry_run: bool = False) -> GenerationPlan:
    """The plan of a run into --out: `plan_samples`, with the samples already complete in the folder, refused when
    the folder holds a run with other settings. `keep` narrows the samples (a manifest's shard) before the folder
    is read, so samples of other shards are not hashed. `dry_run`: files not downloaded yet are listed, not
    refused."""
    plan = plan_samples(request, qc, dry_run=dry_run)
    if keep is not None:
        plan.samples = [task for task in plan.samples if keep(task)]
    plan.samples = with_completion(plan.samples, request.overwrite)
    return checked_against_folder(plan)


def checked_against_folder(plan: GenerationPlan) -> GenerationPlan:
    """The plan, refused (exit 2) when --out holds a run with other settings; samples whose files do not match
    their sidecars are made again, with a warning (engine/run_folder.py)."""
    check_record(plan)
    plan.samples = verified_samples(plan, plan.warnings.append)
    for task in plan.pending:  # a link or a folder where a file goes: refused now, not after the denoising
        for path in (*task.paths, sample_lock_path(task.sidecar)):
            check_replaceable(path)
    return plan
