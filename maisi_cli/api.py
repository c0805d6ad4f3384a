"""maisi as a library: `Generator` makes image + label pairs in memory, with its networks loaded once; `qc`,
`preview` and `fid` are the checks of the command line as functions. The CLI and the service are faces of this
module; docs/python-api.md shows it in use.

    from maisi_cli import Generator

    generator = Generator(model="demo")
    for sample in generator.generate(num_samples=3, seed=7):
        print(sample.image.shape, sample.qc["passed"])
        sample.save("out/")
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from maisi_cli.checks import model_statistics_file, preview, qc
from maisi_cli.config import parse_anatomy, parse_size, parse_spacing
from maisi_cli.engine.fid import FidReport, FidSettings, run_fid
from maisi_cli.engine.loading import load_networks
from maisi_cli.engine.locks import SampleLock, sample_lock_path
from maisi_cli.engine.manifest import Case, CaseReport, ManifestPlan, plan_manifest, run_manifest
from maisi_cli.engine.masks.user import UserMask, user_mask_from_array
from maisi_cli.engine.networks import LoadedModel
from maisi_cli.engine.outputs import checked_format
from maisi_cli.engine.plan import GenerationPlan, plan_samples, sample_paths
from maisi_cli.engine.progress import ProgressCallback, no_progress
from maisi_cli.engine.qc import QCOptions
from maisi_cli.engine.run import GenerationReport, run_generation, sample_affine, write_sample
from maisi_cli.engine.run_folder import plan_generation, record_weights, settings_sha256
from maisi_cli.engine.samples import CheckedSample, checked_sample_sidecar, generate_checked_sample
from maisi_cli.errors import MaisiError, OutputError, UsageError
from maisi_cli.levers import plan_levers
from maisi_cli.io.files import writable_folder
from maisi_cli.models import get_model
from maisi_cli.request import GenerateRequest

PathLike = str | os.PathLike
Triple = tuple[int, int, int]
WarningCallback = Callable[[str], None]


class MaisiWarning(UserWarning):
    """A warning of a run that still makes sense (a resampled mask, a sample kept after failing the check)."""


def warn(message: str) -> None:
    warnings.warn(message, MaisiWarning, stacklevel=3)


@dataclass
class Sample:
    """One generated pair, in memory. `image`: int16 HU (MR intensities for an MR model), `labels`: uint8 MAISI ids
    or None (an image-only model), both (X, Y, Z) on the RAS grid `affine`; `qc`: the quality-check report with
    its attempts, or None when the check is off; `sidecar`: the provenance `save` writes beside the files."""
    affine: np.ndarray
    sidecar: dict[str, Any]
    timings: dict[str, float]
    _checked: CheckedSample = field(repr=False)
    _plan: GenerationPlan = field(repr=False)
    _loaded: LoadedModel = field(repr=False)

    @property
    def index(self) -> int:
        return self._checked.task.index

    @property
    def seed(self) -> int:
        return self._checked.task.seed

    @property
    def image(self) -> np.ndarray:
        return self._checked.image

    @property
    def labels(self) -> np.ndarray | None:
        return self._checked.labels

    @property
    def qc(self) -> dict[str, Any] | None:
        return self._checked.qc

    def save(self, folder: PathLike, overwrite: bool = False, output_format: str = "nifti") -> list[Path]:
        """Write what `maisi generate --out FOLDER --format F` writes for this sample: its image and label
        (sample_NNNN_image.nii.gz and _label.nii.gz by default; nii, nrrd or dicom as `--format`), the sidecar
        sample_NNNN.json, byte for byte the same files, and the folder's run record. A folder holding a run with
        other settings is refused unless `overwrite`. Returns the paths written."""
        out = Path(folder)
        output_format = checked_format(output_format, "output_format")
        plan = replace(self._plan, request=self._plan.request.model_copy(
            update={"out": out, "overwrite": overwrite, "output_format": output_format}))
        image, label, sidecar = sample_paths(out, self.index, plan.request.num_samples, output_format)
        task = replace(self._checked.task, image=image, label=None if plan.model.image_only else label,
                       sidecar=sidecar)
        writable_folder(out, "folder")
        record_weights(plan, self._loaded.weight_hashes)
        lock = SampleLock(sample_lock_path(sidecar))
        if not lock.acquire():
            raise OutputError(f"folder: another job holds {lock.path.name} and is writing sample {self.index}; "
                              "wait for it, or save into another folder")
        try:
            started = time.perf_counter() - self.timings.get("total_s", 0.0)
            checked = replace(self._checked, task=task)
            write_sample(plan, self._loaded, task, checked, settings_sha256(plan), started)
        finally:
            lock.release()
        return task.paths


def _triple(value: str | int | Sequence[int] | None) -> Triple | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        return parse_size(str(value))
    return parse_size("x".join(str(int(v)) for v in value))


def _spacing(value: str | float | Sequence[float] | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return parse_spacing(repr(float(value)))
    if isinstance(value, str):
        return parse_spacing(value)
    return parse_spacing("x".join(repr(float(v)) for v in value))


def _anatomy(anatomy: str | Iterable[str] | Mapping[str, float]
             ) -> tuple[tuple[str, ...], tuple[tuple[str, float], ...]]:
    """Names (`"liver"`), names with a size (`"liver:0.5"`, as `--anatomy`), or a mapping name → size."""
    if isinstance(anatomy, Mapping):
        return (), tuple((str(name), float(size)) for name, size in anatomy.items())
    if isinstance(anatomy, str):
        anatomy = [anatomy]
    return parse_anatomy(list(anatomy))


def _user_mask(mask: Any) -> tuple[Path | None, UserMask | None]:
    """(a mask file or class folder, or a label map in memory): a path; an (array, affine) pair; a nibabel
    image."""
    if mask is None:
        return None, None
    if isinstance(mask, (str, os.PathLike)):
        return Path(mask), None
    if isinstance(mask, tuple) and len(mask) == 2:
        labels, affine = mask
        return None, user_mask_from_array(np.asarray(labels), np.asarray(affine))
    if hasattr(mask, "dataobj") and hasattr(mask, "affine"):  # a nibabel image
        return None, user_mask_from_array(np.asarray(mask.dataobj), np.asarray(mask.affine))
    raise UsageError("mask: give a NIfTI path, a class folder, an (array, affine) pair or a nibabel image")


class Generator:
    """A model ready to generate: resolved once, its networks loaded on first use and kept.

    `model`: a name or alias from `maisi models` (or a spec .json); `profile`: auto, 16g, 24g, 32g, 80g, cpu or a
    profile .toml; `device`: None (auto), "cpu", "cuda" or "cuda:N"; `precision`: None (the profile's), fp32, fp16
    or bf16; `weights_dir`: a folder of weight files under their repository names (default: MAISI_WEIGHTS_DIR,
    then the download cache); `backend`: torch, onnx or trt."""
    def __init__(self, model: str = "rflow-ct", profile: str = "auto", device: str | None = None,
                 precision: str | None = None, weights_dir: PathLike | None = None, *, backend: str = "torch",
                 onnx_dir: PathLike | None = None):
        if weights_dir is None and os.environ.get("MAISI_WEIGHTS_DIR"):
            weights_dir = os.environ["MAISI_WEIGHTS_DIR"]
        self.settings = {"model": model, "profile": profile, "device": device or "auto", "precision": precision,
                         "weights_dir": Path(weights_dir) if weights_dir else None, "backend": backend,
                         "onnx_dir": Path(onnx_dir) if onnx_dir else None}
        self.spec = get_model(model)  # an unknown model fails here, not at the first sample
        self.loads = 0  # how many times the networks were loaded (once, unless a plan needs others)
        self._loaded: LoadedModel | None = None
        self._loaded_key: tuple | None = None

    @classmethod
    def for_request(cls, request: GenerateRequest) -> Generator:
        """The generator of a `maisi generate` request (the CLI's)."""
        return cls(request.model, request.profile, request.device, request.precision, request.weights_dir,
                   backend=request.backend, onnx_dir=request.onnx_dir)

    # --- networks --------------------------------------------------------------------------------------------------
    def networks(self, plan: GenerationPlan, on_progress: ProgressCallback = no_progress) -> LoadedModel:
        """The plan's networks: those already loaded when they cover the plan's weight files (and, for an exported
        backend, its latent shape), else loaded now. The plan's mask source is handed the networks it needs."""
        key = (plan.request.backend, plan.precision, plan.device,
               plan.latent_shape if plan.request.backend != "torch" else None,
               plan_levers(plan))  # compiled or channels-last networks are other networks
        wanted = {(w.component, str(w.path)) for w in plan.weights}
        if self._loaded is not None and self._loaded_key is not None and self._loaded_key[0] == key and \
                wanted <= self._loaded_key[1]:
            plan.mask_source.prepare(self._loaded)
            return self._loaded
        self._loaded = None  # free the old networks before the new ones load
        self._loaded = load_networks(plan, on_progress)
        self._loaded_key = (key, frozenset(wanted))
        self.loads += 1
        return self._loaded

    # --- planning --------------------------------------------------------------------------------------------------
    def request(self, **fields: Any) -> GenerateRequest:
        return GenerateRequest(**{**self.settings, **fields})

    def plan_run(self, request: GenerateRequest, qc: QCOptions | None = None, dry_run: bool = False) -> GenerationPlan:
        """The plan of a run into `request.out` (the CLI's `maisi generate`): samples already complete there are
        skipped; a folder holding a run with other settings is refused. `dry_run`: a plan to show, not to run: the
        model's files not downloaded yet are listed in it (`downloads`) instead of refused."""
        return plan_generation(request.model_copy(update=self.settings), qc, dry_run=dry_run)

    def run(self, plan: GenerationPlan, on_progress: ProgressCallback = no_progress,
            on_warning: WarningCallback = warn, on_written: Callable[[Any], None] | None = None) -> GenerationReport:
        """Make and write the plan's pending samples into its folder, under per-sample locks (the CLI's run)."""
        return run_generation(plan, self.networks, on_progress, on_warning, on_written)

    def plan_manifest(self, manifest: PathLike, request: GenerateRequest,
                      qc: QCOptions | None = None, dry_run: bool = False) -> ManifestPlan:
        """The checked plan of `maisi generate --manifest FILE` (engine/manifest.py): each case of this shard
        planned into `request.out`/NAME, every mask read and checked before any network loads."""
        return plan_manifest(Path(manifest), request.model_copy(update=self.settings), qc, dry_run=dry_run)

    def run_manifest(self, plan: ManifestPlan, on_progress: ProgressCallback = no_progress,
                     on_warning: WarningCallback = warn, on_written: Callable[[Any], None] | None = None,
                     on_case: Callable[[Case, GenerationReport], None] = lambda case, report: None
                     ) -> list[CaseReport]:
        """Make each case's pending samples into its folder, the networks loaded once for all cases."""
        return run_manifest(plan, self.networks, on_progress, on_warning, on_written, on_case)

    # --- in memory ---------------------------------------------------------------------------------------------------
    def generate(self, mask: Any = None, *, anatomy: str | Iterable[str] | Mapping[str, float] = (),
                 size: str | int | Sequence[int] | None = None, spacing: str | float | Sequence[float] | None = None,
                 seed: int = 0, steps: int | None = None, num_samples: int = 1, mask_labels: str = "maisi",
                 body_from: PathLike | None = None,
                 label_mode: str = "full",
                 body_regions: Sequence[str] = (), mask_database: PathLike | None = None, augment: bool = True,
                 mask_steps: int | None = None, guidance: float | None = None, qc: bool = True,
                 max_attempts: int = 3, stats: PathLike | None = None, allow_any_size: bool = False,
                 on_progress: ProgressCallback = no_progress, on_warning: WarningCallback = warn) -> list[Sample]:
        """`num_samples` pairs, in memory; nothing is written. The arguments are those of `maisi generate`: `mask`
        is a NIfTI path, a class folder, an (array, affine) pair or a nibabel image (None: the model's mask database,
        or the mask generator when `anatomy` gives sizes); `body_from` a CT path or "labels"; `anatomy` names labels
        the mask must hold ("liver"), or sizes to generate ("liver:0.5" or {"liver": 0.5}). Sample k's seed derives
        from (seed, k), as on the command line, so `generate(seed=S)[k]` equals the CLI's sample k of `--seed S`."""
        names, sizes = _anatomy(anatomy)
        request = self.request(
            size=_triple(size), spacing=_spacing(spacing), num_samples=num_samples, seed=seed, steps=steps,
            anatomy=names, anatomy_sizes=sizes, body_regions=tuple(body_regions),
            mask_database=Path(mask_database) if mask_database else None, augment=augment, mask_steps=mask_steps,
            mask_labels=mask_labels, body_from=str(body_from) if body_from is not None else None,
            label_mode=label_mode, guidance=guidance, allow_any_size=allow_any_size,
            out=Path("."))
        qc_options = QCOptions(enabled=qc, max_attempts=max_attempts, stats=Path(stats) if stats else None)
        mask_path, in_memory = _user_mask(mask)
        if mask_path is not None:
            request = request.model_copy(update={"mask": mask_path})
        plan = plan_samples(request, qc_options, mask=in_memory)
        for message in plan.warnings:
            on_warning(message)
        loaded = self.networks(plan, on_progress)
        samples = []
        for task in plan.samples:
            started = time.perf_counter()
            checked = generate_checked_sample(plan, loaded, task, on_progress, on_warning)
            timings = {**checked.timings, "total_s": time.perf_counter() - started}
            samples.append(self._sample(plan, loaded, checked, timings))
        return samples

    @staticmethod
    def _sample(plan: GenerationPlan, loaded: LoadedModel, checked: CheckedSample,
                timings: dict[str, float]) -> Sample:
        return Sample(sample_affine(plan, checked), checked_sample_sidecar(plan, loaded, checked, timings), timings,
                      checked, plan, loaded)


# --- checks (qc and preview import no torch: maisi_cli/checks.py) ---------------------------------------------
def fid(real: PathLike, synth: PathLike, *, planes: Sequence[str] = ("xy", "yz", "zx"),
        target_shape: Triple | None = (512, 512, 512), spacing: tuple[float, float, float] | None = None,
        center_slices_ratio: float | None = None, batch_size: int = 32, extractor: PathLike | None = None,
        extractor_name: str = "radimagenet-resnet50", cache: PathLike | None = None, device: str = "auto",
        nproc: int = 1, on_progress: ProgressCallback = no_progress,
        on_warning: WarningCallback = warn) -> FidReport | None:
    """2.5D FID between real and synthetic volumes (each a folder of NIfTI files, a datalist .json or a .txt list),
    per plane and averaged, as `maisi fid`. `nproc` > 1 splits the files over local processes (the result equals
    one process). Under torchrun every rank computes its share and rank 0 gets the report; the others get None."""
    settings = FidSettings(planes=tuple(p.strip().lower() for p in planes), target_shape=target_shape,
                           spacing=spacing, center_slices_ratio=center_slices_ratio, batch_size=batch_size)
    report, is_main = run_fid(Path(real), Path(synth), settings, Path(extractor) if extractor else None,
                              Path(cache) if cache else None, device, on_progress, extractor_name=extractor_name,
                              nproc=nproc, on_warning=on_warning)
    return report if is_main else None


__all__ = ["Generator", "MaisiError", "MaisiWarning", "Sample", "fid", "model_statistics_file", "preview", "qc"]
