"""nnU-Net v2 raw datasets from maisi run folders (`maisi data nnunet`), and a MONAI datalist of the same cases.

A run folder's sample is taken when it is complete (its sidecar `sample_NNNN.json` is written last) and its image
and label are the bytes the sidecar's `files_sha256` records, so a folder still being copied is refused rather than
half used. Each sample becomes the case `maisi_NNNN`: `imagesTr/maisi_NNNN_0000.nii.gz` (the image's bytes as they
are) and `labelsTr/maisi_NNNN.nii.gz` (the label map with the kept MAISI ids renumbered 1..K, nnU-Net's consecutive
classes; every other id becomes background 0). `maisi_labels.json` beside `dataset.json` maps each nnU-Net id to its
MAISI id and name and records each case's source keyed by the image's sha256, so adding the same sample again adds
nothing, and adding another run continues the numbering with the same label set.

Write order, so that an interrupted run leaves a dataset a re-run completes: per case the label, then the image
(nnU-Net counts a case by its image), then the record; `dataset.json` (numTraining counted from imagesTr as nnU-Net
counts it) last. A case file not in the record is an interrupted run's and is written over by the next case.

numpy and nibabel only (no torch, Typer or rich).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from maisi_cli import __version__
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.io.datalists import write_datalist
from maisi_cli.io.files import sha256_of_input, write_atomic, writable_folder
from maisi_cli.io.label_maps import present_labels, relabelled
from maisi_cli.io.nifti import gzip_bytes, read_nifti, write_nifti
from maisi_cli.io.provenance import write_json
from maisi_cli.labels import BODY_LABEL, label_dictionary, label_id

DATASET_NAME = re.compile(r"Dataset(\d{3})_[A-Za-z0-9_-]+")
FILE_ENDING = ".nii.gz"
CHANNEL = "_0000"  # nnU-Net's suffix of a case's first (here only) channel
CASE_PREFIX = "maisi_"
SIDE_FILE = "maisi_labels.json"
DATASET_JSON = "dataset.json"
FOLDS = 5  # the datalist's "fold": case position mod 5, as `maisi data phantoms` writes
SIDECAR = re.compile(r"sample_(\d+)\.json")
ALL = "all"
NIFTI_SUFFIXES = {"nifti": ".nii.gz", "nii": ".nii"}  # a run's --format (its sidecar's "format") -> suffix
LABELS_SHAPE = "all, all,body, or anatomy names separated by commas (e.g. liver,spleen)"

WarningCallback = Callable[[str], None]


class RunFolderError(MaisiError):
    """A run folder's sample is not what its sidecar records (changed, truncated or still being copied)."""


# --- the run folders' samples ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSample:
    """A complete sample of a run folder, its files checked against its sidecar's sha256."""

    run: Path
    index: int
    image: Path
    label: Path
    image_sha256: str
    label_sha256: str
    seed: int | None
    model: str | None
    present: tuple[int, ...] = ()  # the MAISI ids its label map holds, background excluded

    def provenance(self, case: str) -> dict[str, Any]:
        return {"case": case, "run": str(self.run), "sample_index": self.index, "seed": self.seed,
                "model": self.model, "image_sha256": self.image_sha256, "label_sha256": self.label_sha256}


def run_sidecars(run: Path) -> list[tuple[int, Path]]:
    """(index, sidecar) of each complete sample of `run`, by index; a folder with none is refused."""
    if not run.is_dir():
        raise UsageError(f"RUN_DIR: '{run}' is not a folder; give folders `maisi generate` wrote")
    found = sorted((int(m.group(1)), p) for p in run.iterdir() if (m := SIDECAR.fullmatch(p.name)))
    if not found:
        raise UsageError(f"RUN_DIR: '{run}' holds no complete sample (no sample_NNNN.json); give a folder "
                         "`maisi generate` wrote, after its run has finished")
    return found


def incomplete_count(run: Path, sidecars: Iterable[tuple[int, Path]]) -> int:
    """Samples whose image is there but whose sidecar is not yet: a run still writing, or one that was stopped."""
    complete = {index for index, _ in sidecars}
    pattern = re.compile(r"sample_(\d+)_image\..+")
    return len({int(m.group(1)) for p in run.iterdir() if (m := pattern.fullmatch(p.name))} - complete)


def sample_file(run: Path, sidecar: dict[str, Any], index: int, role: str) -> Path | None:
    """The NIfTI file of `role` ("image" or "label"); None for the label of an image-only sample (its sidecar
    records none). A sample written in another format is refused: nnU-Net reads NIfTI."""
    if role not in sidecar["files_sha256"]:
        return None
    output_format = sidecar.get("format", "nifti")
    suffix = NIFTI_SUFFIXES.get(output_format)
    if suffix is None:
        raise RunFolderError(f"RUN_DIR: sample {index} of {run} was written as {output_format}; nnU-Net datasets are "
                             "NIfTI: generate with --format nifti")
    files = sidecar.get("files")
    named = files.get(role) if isinstance(files, dict) else None
    if isinstance(named, str):  # the sidecar names the pair's files by role
        if Path(named).name != named or named in (".", ".."):
            raise RunFolderError(f"RUN_DIR: {run}/sample_{index:04d}.json names {role} file {named!r}, not a file "
                                 "name in its folder; the sidecar is damaged: re-run `maisi generate` into it")
        return run / named
    return run / f"sample_{index:04d}_{role}{suffix}"


def checked_sha256(path: Path, recorded: Any, sidecar: Path) -> str:
    """The file's sha256, refused unless it is the one the sidecar records."""
    if not path.name.endswith((".nii.gz", ".nii")):
        raise RunFolderError(f"RUN_DIR: {path} is not NIfTI; nnU-Net datasets are NIfTI: generate with --format "
                             "nifti")
    if not path.is_file():
        raise RunFolderError(f"RUN_DIR: {path} is missing though {sidecar.name} records it; copy the folder again, "
                             "or re-run `maisi generate` into it")
    digest = sha256_of_input(path)
    if digest != recorded:
        raise RunFolderError(f"RUN_DIR: {path} does not match the sha256 {sidecar.name} records (changed, truncated "
                             "or half-copied); copy the folder again, or re-run `maisi generate` into it")
    return digest


def read_sample(run: Path, index: int, sidecar_path: Path) -> SourceSample | None:
    """The sample, checked (None for an image-only sample: it has no label map to train on)."""
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        sidecar = None
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("files_sha256"), dict):
        raise RunFolderError(f"RUN_DIR: {sidecar_path} is not a maisi sidecar with files_sha256 (unreadable or "
                             "damaged); re-run `maisi generate` into the folder")
    image, label = (sample_file(run, sidecar, index, role) for role in ("image", "label"))
    if label is None:
        return None
    if image is None:
        raise RunFolderError(f"RUN_DIR: {sidecar_path} records no image; re-run `maisi generate` into the folder")
    recorded = sidecar["files_sha256"]
    image_sha = checked_sha256(image, recorded["image"], sidecar_path)
    label_sha = checked_sha256(label, recorded["label"], sidecar_path)
    model = sidecar.get("model")
    seed = sidecar.get("sample_seed")
    return SourceSample(run, int(sidecar.get("sample_index", index)), image, label, image_sha, label_sha,
                        seed if isinstance(seed, int) else None,
                        model.get("name") if isinstance(model, dict) else None)


def read_labels(sample: SourceSample) -> tuple[np.ndarray, np.ndarray]:
    """The sample's label map (uint8, as stored) and affine."""
    labels, affine = read_nifti(sample.label, "RUN_DIR", "label map")
    if labels.dtype != np.uint8:
        raise RunFolderError(f"RUN_DIR: {sample.label} holds {labels.dtype} values, not a uint8 label map as maisi "
                             "writes; re-run `maisi generate` into the folder")
    return labels, affine


def collect_samples(runs: Sequence[Path], on_progress: ProgressCallback,
                    on_warning: WarningCallback) -> list[SourceSample]:
    """Every complete, checked sample with a label map of `runs` (in the order given, then by index), with the ids
    each label map holds. Nothing is written before all are checked: one damaged file refuses the whole call."""
    listed = [(Path(run).resolve(), run_sidecars(Path(run))) for run in runs]
    total = sum(len(sidecars) for _, sidecars in listed)
    samples: list[SourceSample] = []
    done = 0
    for run, sidecars in listed:
        image_only = 0
        for index, sidecar in sidecars:
            sample = read_sample(run, index, sidecar)
            if sample is None:
                image_only += 1
            else:
                labels, _ = read_labels(sample)
                samples.append(replace(sample, present=tuple(present_labels(labels))))
            done += 1
            on_progress(ProgressEvent("hash", done, total, "run folders"))
        if image_only:
            on_warning(f"RUN_DIR: {image_only} sample(s) of {run} have no label map (an image-only model); skipped")
        waiting = incomplete_count(run, sidecars)
        if waiting:
            on_warning(f"RUN_DIR: {waiting} sample(s) of {run} have no sidecar yet (still being written, or "
                       "stopped); skipped")
    if not samples:
        raise UsageError("RUN_DIR: no sample with a label map in " + ", ".join(str(r) for r, _ in listed) +
                         "; give folders of a model that writes labels")
    return samples


# --- the label set ----------------------------------------------------------------------------------------------
def parse_labels(text: str) -> list[int | str]:
    """`--labels` as a list of MAISI ids and the marker "all", in the order given."""
    tokens = [token.strip() for token in text.split(",")]
    if not text.strip() or any(not token for token in tokens):
        raise UsageError(f"--labels: '{text}' is not a label list; give {LABELS_SHAPE}")
    parsed: list[int | str] = []
    for token in tokens:
        if token.lower() == ALL:
            parsed.append(ALL)
            continue
        try:
            parsed.append(label_id(token))
        except UsageError as error:  # label_id names --anatomy, the option it was first written for
            raise UsageError(re.sub(r"^--anatomy:", "--labels:", str(error))) from None
    return parsed


def chosen_labels(selection: Sequence[int | str], present: set[int]) -> list[int]:
    """The MAISI ids to keep, in nnU-Net order: "all" is every id present but the body (200), by id, in its place."""
    chosen: list[int] = []
    for item in selection:
        expanded = sorted(present - {BODY_LABEL}) if item == ALL else [int(item)]
        chosen.extend(i for i in expanded if i not in chosen)
    return chosen


def label_name(maisi_id: int) -> str:
    names = {ident: name for name, ident in label_dictionary().items()}
    return names.get(maisi_id, f"label {maisi_id}")


def label_option(ids: Sequence[int]) -> str:
    """A `--labels` value that selects `ids` in this order."""
    return ",".join(label_name(i).replace(" ", "_") for i in ids)


def label_table(ids: Sequence[int]) -> list[dict[str, Any]]:
    return [{"nnunet": number, "maisi": maisi, "name": label_name(maisi)} for number, maisi in enumerate(ids, 1)]


def lookup_table(ids: Sequence[int]) -> np.ndarray:
    """MAISI id → nnU-Net id for every uint8 value; ids not kept map to background 0."""
    table = np.zeros(256, dtype=np.uint8)
    table[list(ids)] = np.arange(1, len(ids) + 1, dtype=np.uint8)
    return table


# --- the dataset folder -------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """The dataset's label set (MAISI ids, nnU-Net ids 1..K in order) and maisi's record of its cases."""

    folder: Path
    labels: list[int]
    cases: list[dict[str, Any]] = field(default_factory=list)
    dataset_json: dict[str, Any] | None = None  # as found; None for a new dataset
    exists: bool = False

    @property
    def next_number(self) -> int:
        numbers = [int(c["case"][len(CASE_PREFIX):]) for c in self.cases
                   if str(c.get("case", "")).startswith(CASE_PREFIX) and c["case"][len(CASE_PREFIX):].isdigit()]
        return max(numbers, default=-1) + 1

    def case_of(self, image_sha256: str) -> str | None:
        return next((c["case"] for c in self.cases if c.get("image_sha256") == image_sha256), None)


def checked_dataset_name(out: Path) -> str:
    """The nnU-Net id of `out` (`DatasetNNN_Name`), refused in one line otherwise, or when a sibling folder holds
    the same id under another name (nnU-Net then cannot tell which dataset an id means)."""
    match = DATASET_NAME.fullmatch(out.name)
    if match is None:
        raise UsageError(f"--out: '{out.name}' is not an nnU-Net dataset name; name the folder DatasetNNN_Name "
                         "(three digits, then letters, digits, _ or -), e.g. Dataset501_MaisiCT")
    number = match.group(1)
    if out.parent.is_dir():
        twins = sorted(p.name for p in out.parent.iterdir()
                       if p.is_dir() and p.name != out.name and p.name.startswith(f"Dataset{number}_"))
        if twins:
            raise UsageError(f"--out: {out.parent} already holds {twins[0]} with the dataset id {number}; nnU-Net "
                             "needs one name per id: choose another number")
    return number


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        document = None
    if not isinstance(document, dict):
        raise UsageError(f"--out: {path} is not a readable {what}; remove the folder, or choose another --out")
    return document


def read_dataset(out: Path) -> Dataset | None:
    """The dataset at `out` when there is one (maisi's record, or a dataset.json whose label names are anatomy
    names), checked to be one maisi can add to; None when `out` holds neither file."""
    side, dataset_json = out / SIDE_FILE, out / DATASET_JSON
    document = read_json_file(dataset_json, "nnU-Net dataset.json") if dataset_json.exists() else None
    if document is not None:
        check_dataset_json(dataset_json, document)
    if side.exists():
        record = read_json_file(side, f"maisi record ({SIDE_FILE})")
        try:
            labels = [int(entry["maisi"]) for entry in sorted(record["labels"], key=lambda e: int(e["nnunet"]))]
            cases = [dict(case) for case in record["cases"]]
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"--out: {side} is not a maisi record of labels and cases; remove the folder, or choose "
                             "another --out") from None
        return Dataset(out, labels, cases, document, exists=True)
    if document is None:
        return None
    return Dataset(out, labels_by_name(dataset_json, document), [], document, exists=True)


def check_dataset_json(path: Path, document: dict[str, Any]) -> None:
    """An existing dataset maisi can add CT cases to: one CT channel, .nii.gz files, plain integer labels."""
    channels = document.get("channel_names", document.get("modality"))
    if not isinstance(channels, dict) or [str(v).lower() for v in channels.values()] != ["ct"]:
        raise UsageError(f"--out: {path} has channels {channels}, not one CT channel; maisi adds CT cases only: choose "
                         "another --out")
    if document.get("file_ending") != FILE_ENDING:
        raise UsageError(f"--out: {path} has file_ending {document.get('file_ending')!r}; maisi writes {FILE_ENDING}: "
                         "choose another --out")
    labels = document.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise UsageError(f"--out: {path} has no plain integer labels (regions are not supported); choose another --out")


def labels_by_name(path: Path, document: dict[str, Any]) -> list[int]:
    """The MAISI ids of a dataset.json maisi did not write, from its label names (anatomy names, any case,
    underscores, TotalSegmentator's names)."""
    ordered = sorted(((value, name) for name, value in document["labels"].items() if value != 0))
    ids = []
    for value, name in ordered:
        try:
            ids.append(label_id(name))
        except UsageError:
            raise UsageError(f"--out: {path} names label {value} '{name}', which is not in the label dictionary; maisi "
                             "adds to a dataset whose labels it can name: choose another --out") from None
    if [value for value, _ in ordered] != list(range(1, len(ordered) + 1)):
        raise UsageError(f"--out: {path} labels are not consecutive from 1; choose another --out")
    return ids


def dataset_labels(selection: Sequence[int | str], present: set[int], existing: Dataset | None,
                   out: Path) -> list[int]:
    """The MAISI ids of the dataset, in nnU-Net order: the selection's for a new dataset; an existing dataset's
    own, when the selection names exactly them or ("all") the samples hold no label outside them."""
    chosen = chosen_labels(selection, present)
    if existing is None:
        if not chosen:
            raise UsageError("--labels: the samples hold no organ label to keep; give --labels with names the samples "
                             "hold, or all,body for the body alone")
        return chosen
    if ALL not in selection:
        if chosen != existing.labels:
            raise UsageError(f"--labels: {out.name} labels {label_option(existing.labels)} (in that order), not "
                             f"{label_option(chosen)}; give --labels {label_option(existing.labels)}, or another "
                             "--out")
        return existing.labels
    outside = [i for i in chosen if i not in existing.labels]
    if outside:
        raise UsageError(f"--labels: the samples hold {label_option(outside)}, which {out.name} does not label; give "
                         f"--labels {label_option(existing.labels)} to keep its labels (the rest become background 0), "
                         "or another --out")
    return existing.labels


def case_ids(folder: Path) -> list[str]:
    """The cases of imagesTr as nnU-Net finds them: file names ending in `_XXXX.nii.gz`, the channel cut off."""
    images = folder / "imagesTr"
    if not images.is_dir():
        return []
    crop = len(FILE_ENDING) + len(CHANNEL)
    return sorted({p.name[:-crop] for p in images.iterdir() if p.name.endswith(FILE_ENDING) and p.is_file()})


def dataset_document(dataset: Dataset, labels: Sequence[int], cases: int) -> dict[str, Any]:
    """dataset.json: nnU-Net's keys (an existing file's other keys kept), and where the cases come from."""
    document = dict(dataset.dataset_json or {})
    if dataset.dataset_json is None:  # an existing file's labels and channels are the set the cases were made for
        document.update({"channel_names": {"0": "CT"},  # "CT": nnU-Net's CT normalisation (dataset HU statistics)
                         "labels": {"background": 0, **{label_name(i): n for n, i in enumerate(labels, 1)}}})
    document.setdefault("name", dataset.folder.name)
    document.setdefault("description", "Synthetic CT volumes and label maps generated by maisi (NVIDIA MAISI)")
    document.update({"numTraining": cases, "file_ending": FILE_ENDING,
                     "maisi": {"about": f"cases {CASE_PREFIX}NNNN are synthetic, from maisi run folders; {SIDE_FILE} "
                                        "maps each label to its MAISI id and records each case's source",
                               "maisi_version": __version__}})
    return document


def record_document(labels: Sequence[int], cases: list[dict[str, Any]]) -> dict[str, Any]:
    return {"about": "nnU-Net label id -> MAISI label id and name; each maisi case's source run folder, sample and "
                     "image sha256 (adding a sample whose image is already here adds nothing)",
            "labels": label_table(labels), "cases": cases}


# --- writing -----------------------------------------------------------------------------------------------------
def nifti_gz(data: bytes) -> bytes:
    """A NIfTI file's bytes as .nii.gz: as they are when already gzipped, else compressed with no timestamp."""
    return data if data[:2] == b"\x1f\x8b" else gzip_bytes(data)  # maisi's own deflate (io/nifti.py)


def write_case(sample: SourceSample, case: str, folder: Path, labels: Sequence[int]) -> None:
    """The case's label (renumbered, or its bytes as they are when no id changes), then its image's bytes."""
    table = lookup_table(labels)
    label_path = folder / "labelsTr" / f"{case}{FILE_ENDING}"
    if all(table[i] == i for i in sample.present):  # every id keeps its number: the file is already the answer
        write_atomic(label_path, nifti_gz(verified_bytes(sample.label, sample.label_sha256, sample)))
    else:
        source, affine = read_labels(sample)
        write_nifti(label_path, relabelled(source, table), affine)
    image = verified_bytes(sample.image, sample.image_sha256, sample)
    write_atomic(folder / "imagesTr" / f"{case}{CHANNEL}{FILE_ENDING}", nifti_gz(image))


def verified_bytes(path: Path, sha256: str, sample: SourceSample) -> bytes:
    """The file's bytes, refused when they changed since they were checked."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RunFolderError(f"RUN_DIR: {path} changed while the dataset was written (sample {sample.index} of "
                             f"{sample.run}); let the copy or run finish, then add the folder again")
    return data


def datalist_items(folder: Path, datalist: Path) -> list[dict[str, Any]]:
    """One "training" item per case of the dataset, paths relative to the datalist's folder, fold = position mod 5."""
    base = datalist.parent.resolve()
    items = []
    for position, case in enumerate(case_ids(folder)):
        image = folder.resolve() / "imagesTr" / f"{case}{CHANNEL}{FILE_ENDING}"
        label = folder.resolve() / "labelsTr" / f"{case}{FILE_ENDING}"
        items.append({"image": os.path.relpath(image, base), "label": os.path.relpath(label, base),
                      "fold": position % FOLDS})
    return items


@dataclass(frozen=True)
class NnunetRun:
    dataset: Path
    labels: list[dict[str, Any]]
    added: list[str]
    already: list[str]
    num_training: int
    datalist: Path | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": str(self.dataset), "dataset_json": str(self.dataset / DATASET_JSON),
                "labels": self.labels, "added": self.added, "already": self.already,
                "num_training": self.num_training, "datalist": str(self.datalist) if self.datalist else None,
                "seconds": round(self.seconds, 3)}


def write_nnunet_dataset(runs: Sequence[Path], out: Path, labels: str = ALL, datalist: Path | None = None,
                         on_progress: ProgressCallback = no_progress,
                         on_warning: WarningCallback = lambda message: None) -> NnunetRun:
    """Add the complete samples of `runs` to the nnU-Net v2 raw dataset `out` (made when missing), keeping the
    labels `labels` selects (see `parse_labels`); with `datalist`, also write a MONAI datalist of all its cases."""
    started = time.perf_counter()
    out = Path(out)
    checked_dataset_name(out)
    selection = parse_labels(labels)
    existing = read_dataset(out) if out.is_dir() else None
    samples = collect_samples(runs, on_progress, on_warning)
    present = {i for sample in samples for i in sample.present}
    ids = dataset_labels(selection, present, existing, out)
    if existing is None:
        for absent in (i for i in ids if i not in present):
            on_warning(f"--labels: {label_name(absent)} ({absent}) is in none of the samples; nnU-Net gets no "
                       "example of it")
    dataset = existing or Dataset(out, ids)
    writable_folder(out, "--out")
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(exist_ok=True)
    added, already = add_cases(dataset, samples, ids, on_progress)
    cases = case_ids(out)
    write_json(out / DATASET_JSON, dataset_document(dataset, ids, len(cases)))
    if datalist is not None:
        datalist = Path(datalist)
        datalist.parent.mkdir(parents=True, exist_ok=True)
        write_datalist(datalist, datalist_items(out, datalist))
    return NnunetRun(out, label_table(ids), added, already, len(cases), datalist, time.perf_counter() - started)


def add_cases(dataset: Dataset, samples: Sequence[SourceSample], labels: Sequence[int],
              on_progress: ProgressCallback) -> tuple[list[str], list[str]]:
    """Write each sample not yet in the dataset as the next case, recording it at once; (added, already there)."""
    added: list[str] = []
    already: list[str] = []
    side = dataset.folder / SIDE_FILE
    if not dataset.exists:
        write_json(side, record_document(labels, dataset.cases))
    for done, sample in enumerate(samples, 1):
        known = dataset.case_of(sample.image_sha256)
        if known is not None:
            already.append(known)
        else:
            case = f"{CASE_PREFIX}{dataset.next_number:04d}"
            write_case(sample, case, dataset.folder, labels)
            dataset.cases.append(sample.provenance(case))
            write_json(side, record_document(labels, dataset.cases))
            added.append(case)
        on_progress(ProgressEvent("write", done, len(samples), "nnU-Net cases"))
    return added, already
