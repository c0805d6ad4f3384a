"""One `maisi generate` run: resolve a request into a plan, then make each sample (denoise → decode → write).

`plan_generation` checks everything it can before any file is written or any network is built;
`run_generation` does the work and reports progress through `on_progress(stage, done, total)`. Each sample is
checked against the organ HU statistics (engine/qc.py) and, when it fails, generated again from the next attempt
seed, up to `QCOptions.max_attempts`; the last attempt is kept either way.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from maisi_cli import __version__
from maisi_cli.config import format_triple
from maisi_cli.engine.masks.sources import FileMaskSource, NoMaskSource, SampleMask
from maisi_cli.engine.masks.user import check_mask_memory, load_condition_mask, read_mask_grid, resample_warning
from maisi_cli.engine.memory import HostMemoryEstimate, check_generation_memory
from maisi_cli.engine.runtime import resolve_device, resolve_precision
from maisi_cli.engine.qc import QCOptions, QCStatistics, check_quality, load_statistics
from maisi_cli.engine.masks.database import region_indices
from maisi_cli.engine.masks.regions import body_region_indices
from maisi_cli.engine.weights import WeightFile, locate_weight
from maisi_cli.errors import GenerationError, MaskError, NoSpaceError, UsageError
from maisi_cli.labels import label_id
from maisi_cli.request import GenerateRequest
from maisi_cli.models import MASK_COMPONENTS, ModelSpec, get_model
from maisi_cli.profiles import DecodePlan, Profile, resolve_profile

ProgressCallback = Callable[[str, int, int], None]
WarningCallback = Callable[[str], None]



@dataclass(frozen=True)
class SampleTask:
    index: int
    seed: int
    image: Path
    label: Path | None  # None: an image-only model writes no label file
    sidecar: Path
    complete: bool

    @property
    def paths(self) -> list[Path]:
        """The sample's files, the sidecar (written last) last."""
        return [p for p in (self.image, self.label, self.sidecar) if p is not None]

    @property
    def file_names(self) -> list[str]:
        return [p.name for p in self.paths]

    def files_exist(self) -> bool:
        """Every file of the sample is there: it is complete (the sidecar is written last)."""
        return all(p.is_file() for p in self.paths)


@dataclass
class GenerationPlan:
    request: GenerateRequest
    model: ModelSpec
    profile: Profile
    device: str
    precision: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    latent_shape: tuple[int, int, int, int]
    steps: int
    decode: DecodePlan
    mask_source: Any  # FileMaskSource | DatabaseMaskSource | GeneratedMaskSource
    anatomy_ids: tuple[int, ...]
    samples: list[SampleTask]
    weights: list[WeightFile]
    warnings: list[str] = field(default_factory=list)
    qc: QCOptions = field(default_factory=QCOptions)
    qc_statistics: QCStatistics | None = None  # None: the quality check is off
    guidance: float | None = None  # classifier-free guidance scale (image-only models); None: off
    qc_note: str | None = None  # why the quality check is off although it was asked for (an image-only model)
    host_memory: HostMemoryEstimate | None = None  # predicted peak host memory (engine/memory.py)

    @property
    def pending(self) -> list[SampleTask]:
        return [s for s in self.samples if not s.complete]

    def memory_estimate(self) -> dict[str, Any]:
        """Predicted peak GPU memory (fp16) of the diffusion loop and of the decode (engine/memory.py), and
        whether it fits the profile's budget."""
        from maisi_cli.engine.memory import estimate_peak_memory

        estimate = estimate_peak_memory(self.model, self.size, self.decode,
                                        guided=self.guidance is not None).as_dict()
        budget = self.profile.budget_bytes
        estimate["budget_gib"] = round(budget / 2**30, 3) if budget else None
        estimate["fits"] = (estimate["peak_gib"] * 2**30 <= budget) if budget else None
        return estimate

    def describe(self) -> dict[str, Any]:
        """The resolved plan as plain data (for --dry-run and the run report)."""
        return {
            "model": self.model.name,
            "model_source": self.model.source,
            "scheduler": self.model.scheduler_kind,
            "profile": self.profile.name,
            "device": self.device,
            "precision": self.precision,
            "backend": self.request.backend,
            "size": list(self.size),
            "spacing": list(self.spacing),
            "latent_shape": list(self.latent_shape),
            "steps": self.steps,
            "decode": self.decode.model_dump(),
            "memory": self.memory_estimate(),
            "host_memory": self.host_memory.as_dict() if self.host_memory is not None else None,
            "mask": self.mask_source.describe(),
            "image_only": self.model.image_only,
            "output_intensity": self.model.output_intensity,
            "guidance": self.guidance,
            "anatomy": list(self.request.anatomy),
            "anatomy_sizes": dict(self.request.anatomy_sizes),
            "body_regions": list(self.request.body_regions),
            "label_mode": None if self.model.image_only else self.request.label_mode,
            "out": str(self.request.out),
            "seed": self.request.seed,
            "num_samples": self.request.num_samples,
            "shard": f"{self.request.shard[0]}/{self.request.shard[1]}",
            "weights": {w.component: str(w.path) for w in self.weights},
            "samples": [
                {"index": s.index, "seed": s.seed, "status": "complete" if s.complete else "to write",
                 "files": s.file_names}
                for s in self.samples
            ],
            "warnings": list(self.warnings),
            "qc": {"enabled": self.qc_statistics is not None, "strict": self.qc.strict,
                   "max_attempts": self.qc.max_attempts if self.qc_statistics is not None else 1,
                   "statistics": self.qc_statistics.source if self.qc_statistics is not None else None,
                   **({"note": self.qc_note} if self.qc_note else {})},
        }


@dataclass
class SampleResult:
    index: int
    seed: int
    # "written"; "skipped" (complete before, or finished by another job meanwhile); "locked" (another live job
    # holds its lock: left to it); "failed" (its generation raised; nothing of it is kept, a re-run retries it)
    status: str
    files: list[str]
    seconds: float = 0.0
    qc: dict[str, Any] | None = None  # {"passed", "failed"} of the kept attempt; None when not checked
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {"attempt", "seed", "passed", "failed"}
    timings: dict[str, float] = field(default_factory=dict)  # the sidecar's timings of a sample written now
    error: str | None = None  # why a "failed" sample failed


@dataclass
class GenerationReport:
    plan: dict[str, Any]
    samples: list[SampleResult]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # run-level: load_s, samples_s, total_s

    def indices(self, status: str) -> list[int]:
        return [s.index for s in self.samples if s.status == status]

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "written": self.indices("written"),
            "skipped": self.indices("skipped"),
            "locked": self.indices("locked"),
            "failed": self.indices("failed"),
            "qc_failed": self.qc_failed,
            "samples": [s.__dict__ for s in self.samples],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "seconds": round(self.seconds, 3),
        }

    @property
    def qc_failed(self) -> list[int]:
        """Indices whose kept attempt failed the quality check (written now, or recorded in a skipped sidecar)."""
        return [s.index for s in self.samples if s.qc is not None and not s.qc["passed"]]


# --- small pieces ------------------------------------------------------------------------------------------------
def sample_paths(out: Path, index: int, num_samples: int) -> tuple[Path, Path, Path]:
    stem = f"sample_{index:0{max(4, len(str(num_samples - 1)))}d}"
    return out / f"{stem}_image.nii.gz", out / f"{stem}_label.nii.gz", out / f"{stem}.json"


def sample_tasks(request: GenerateRequest, image_only: bool = False) -> list[SampleTask]:
    """This shard's samples: index k belongs to shard k mod N. A sample is complete when its sidecar (written
    last) and its images exist (the image alone for an image-only model: it has no label file)."""
    from maisi_cli.engine.sampling import derive_sample_seed

    shard_index, shard_count = request.shard
    tasks = []
    for index in range(shard_index, request.num_samples, shard_count):
        image, label, sidecar = sample_paths(request.out, index, request.num_samples)
        task = SampleTask(index, derive_sample_seed(request.seed, index), image, None if image_only else label,
                          sidecar, False)
        tasks.append(replace(task, complete=not request.overwrite and task.files_exist()))
    return tasks


# --- planning ----------------------------------------------------------------------------------------------------
def plan_generation(request: GenerateRequest, qc: QCOptions | None = None) -> GenerationPlan:
    """The checked plan. `qc` defaults to the CLI's defaults (check on, 3 attempts, packaged statistics)."""
    qc = qc or QCOptions()
    model = get_model(request.model)
    warnings: list[str] = []
    size = request.size or model.default_size
    spacing = request.spacing or model.default_spacing(size)
    lifted = model.check_request(size, spacing, request.allow_any_size)
    warnings += [f"{p} (allowed by --allow-any-size)" for p in lifted]
    steps = request.steps or model.default_steps
    if model.scheduler_kind == "ddpm" and steps < model.default_steps:
        warnings.append(f"--steps: {steps} DDPM steps is fewer than the {model.default_steps} it was trained for; "
                        "quality is not guaranteed")
    if model.image_only:
        refuse_mask_options(request, model, qc)
    guidance = resolve_guidance(request, model)
    if request.body_regions and not model.uses_body_region:
        raise UsageError(f"--body-region: model {model.name} takes no body-region input; drop it (the ddpm models "
                         "use it)")
    regions = region_indices(request.body_regions)
    device = resolve_device(request.device)
    profile = resolve_profile(request.profile, device)
    if request.backend == "onnx" and request.precision is None:
        precision = "fp32"  # the exported graphs are fp32
    else:
        precision = resolve_precision(request.precision, profile, device)
    if request.backend != "torch":
        from maisi_cli.engine.backends import check_backend

        check_backend(request.backend, device, request.precision, request.onnx_dir, model)
        if guidance is not None and guidance > 1:
            raise UsageError(f"--guidance: runs with --backend torch only (the {request.backend} graphs take one "
                             "sample per call); drop --guidance or --backend")
    anatomy_ids = tuple(label_id(name) for name in request.anatomy)
    latent_shape = model.latent_shape(size)
    split_axis = int(model.definition("autoencoder").get("dim_split", 1))
    decode = profile.decode_plan(latent_shape[1:], size, split_axis=split_axis, spec=model)

    weights = [locate_weight(model, component, request.weights_dir) for component in model.image_components]
    mask_grid = None
    if request.mask is not None and not request.anatomy_sizes:  # sized from its header, before it is read
        # before the mask sources (a database's resampled candidates are read while planning); load_condition_mask
        # checks each mask file it reads again from its header, the user's included
        mask_grid, header = read_mask_grid(request.mask, spacing)
        check_mask_memory(request.mask, mask_grid, header, size, spacing)
    host_memory = check_generation_memory(model, size, decode, device, precision, profile.name,
                                          guided=guidance is not None, mask=mask_grid)
    qc_note = None
    if model.image_only:
        source: Any = NoMaskSource()
        if qc.enabled:
            qc_note = (f"off: it checks organ HU of CT against a condition mask, and model {model.name} is "
                       "image-only")
            qc = qc.model_copy(update={"enabled": False})
    elif request.anatomy_sizes:
        source, anatomy_ids, mask_weights = generated_source(request, model, size, spacing, device, precision,
                                                             profile)
        weights += mask_weights
    elif request.mask is not None:
        source = file_source(request, model, size, spacing, anatomy_ids, warnings)
    else:
        source = database_mask_source(request, model, size, spacing, anatomy_ids, regions, device)
    if request.label_mode == "requested" and not anatomy_ids:
        raise UsageError("--label-mode requested: name the anatomies to keep with --anatomy NAME")
    qc_statistics = load_statistics(qc_statistics_file(model, qc, request)) if qc.enabled else None  # fails now

    plan = GenerationPlan(
        request=request, model=model, profile=profile, device=device, precision=precision, size=size,
        spacing=spacing, latent_shape=latent_shape, steps=steps, decode=decode, mask_source=source,
        anatomy_ids=anatomy_ids, samples=sample_tasks(request, model.image_only), weights=weights,
        warnings=warnings, qc=qc, qc_statistics=qc_statistics, guidance=guidance, qc_note=qc_note,
        host_memory=host_memory,
    )
    return checked_against_folder(plan)


def checked_against_folder(plan: GenerationPlan) -> GenerationPlan:
    """The plan, refused (exit 2) when --out holds a run with other settings; samples whose files do not match
    their sidecars are made again, with a warning (engine/run_folder.py)."""
    from maisi_cli.engine.locks import sample_lock_path
    from maisi_cli.engine.run_folder import check_record, verified_samples
    from maisi_cli.io.files import check_replaceable

    check_record(plan)
    plan.samples = verified_samples(plan, plan.warnings.append)
    for task in plan.pending:  # a link or a folder where a file goes: refused now, not after the denoising
        for path in (*task.paths, sample_lock_path(task.sidecar)):
            check_replaceable(path)
    return plan


def refuse_mask_options(request: GenerateRequest, model: ModelSpec, qc: QCOptions) -> None:
    """An image-only model takes no condition mask and writes no label file: the options about them are usage
    errors, named one at a time."""
    given = (
        ("--mask", request.mask is not None),
        ("--anatomy", bool(request.anatomy or request.anatomy_sizes)),
        ("--mask-database", request.mask_database is not None),
        ("--mask-steps", request.mask_steps is not None),
        ("--label-mode requested", request.label_mode == "requested"),
        ("--body-region", bool(request.body_regions)),
        ("--strict-qc", qc.strict),
        ("--stats", qc.stats is not None),
    )
    for option, present in given:
        if present:
            raise UsageError(f"model {model.name} generates images only (no ControlNet): drop {option}")
    if model.uses_body_region:
        raise UsageError(f"model {model.name}: an image-only model with body-region inputs is not supported (its "
                         "regions would come from a mask); set include_body_region false in its spec")


def resolve_guidance(request: GenerateRequest, model: ModelSpec) -> float | None:
    """The classifier-free guidance scale: `--guidance`, else the spec's `cfg_guidance_scale`; None when off (1)."""
    if request.guidance is not None and not model.image_only:
        raise UsageError(f"--guidance: model {model.name} is conditioned through its ControlNet; classifier-free "
                         "guidance is for image-only models (e.g. rflow-mr); drop it")
    if model.guidance_scale is not None and not model.image_only:
        raise UsageError(f"model {model.name}: its spec sets cfg_guidance_scale, which needs an image-only model "
                         "(no ControlNet)")
    scale = request.guidance if request.guidance is not None else model.guidance_scale
    if scale is None or scale <= 1:
        return None
    if not model.uses_modality:
        raise UsageError(f"--guidance: model {model.name} has no modality class input (num_class_embeds) to guide "
                         "on; drop it")
    return float(scale)


def qc_statistics_file(model: ModelSpec, qc: QCOptions, request: GenerateRequest) -> Path | None:
    """`--stats FILE`, else the model's own organ statistics (the demo ships those of its phantoms), else None: the
    packaged statistics of the released CT data."""
    if qc.stats is not None:
        return qc.stats
    if "qc_statistics" in model.datasets:
        return locate_weight(model, "qc_statistics", request.weights_dir).path
    return None


def file_source(request: GenerateRequest, model: ModelSpec, size: tuple[int, int, int],
                spacing: tuple[float, float, float], anatomy_ids: tuple[int, ...], warnings: list[str]) -> FileMaskSource:
    if request.mask_database is not None:
        raise UsageError("--mask-database: drop it when --mask gives the condition mask")
    assert request.mask is not None
    mask = load_condition_mask(request.mask, size, spacing)
    if mask.resampled:
        warnings.append(resample_warning(mask, request.mask, size, spacing))
    present = set(np.unique(mask.labels).tolist())
    for name, ident in zip(request.anatomy, anatomy_ids):
        if ident not in present:
            raise MaskError(f"--anatomy: '{name}' (label {ident}) is not in the mask '{request.mask}'; "
                            "drop it or use a mask that has it")
    if model.uses_body_region and not request.body_regions:
        body_region_indices(mask.labels)  # fail now, not after loading the networks
    return FileMaskSource(request.mask, mask)


def database_mask_source(request: GenerateRequest, model: ModelSpec, size: tuple[int, int, int],
                         spacing: tuple[float, float, float], anatomy_ids: tuple[int, ...], regions: tuple[int, ...],
                         device: str) -> Any:
    """Candidates from `--mask-database FILE` (masks relative to its folder), else from the model's released
    database and mask archive (unpacked under MAISI_HOME when first used, never while planning), or, for a model
    whose spec names no archive (the bundled demo), masks relative to its database file."""
    from maisi_cli.config import maisi_home
    from maisi_cli.engine.masks.database import read_database
    from maisi_cli.engine.masks.sources import database_source

    archive = None
    if request.mask_database is not None:
        database = request.mask_database.expanduser()
    else:
        if "mask_database" not in model.datasets:
            raise UsageError(f"--mask: model {model.name} ships no candidate-mask database; pass --mask FILE or "
                             "--mask-database FILE")
        database = locate_weight(model, "mask_database", request.weights_dir).path
        if "mask_archive" in model.datasets:
            archive = locate_weight(model, "mask_archive", request.weights_dir).path
    entries = read_database(database)
    return database_source(database, entries, anatomy_ids, regions, size, spacing, request.seed, request.num_samples,
                           request.augment, device, root=None if archive else database.parent, archive=archive,
                           cache_root=maisi_home() / "masks", allow_outside=request.allow_outside_database)


def generated_source(request: GenerateRequest, model: ModelSpec, size: tuple[int, int, int],
                     spacing: tuple[float, float, float], device: str, precision: str,
                     profile: Profile) -> tuple[Any, tuple[int, ...], list[WeightFile]]:
    """(the mask generator for `--anatomy NAME:SIZE`, the controlled anatomies — they become the requested labels —,
    the mask networks' weight files)."""
    from maisi_cli.engine.masks.generation import (check_size_requests, controlled_label_ids, read_size_table,
                                                   size_condition, target_tumour_label)
    from maisi_cli.engine.masks.sources import GeneratedMaskSource

    if request.mask is not None or request.mask_database is not None:
        raise UsageError("--anatomy NAME:SIZE generates the mask; drop --mask / --mask-database")
    if not all(component in model.weights for component in MASK_COMPONENTS):
        raise UsageError(f"--anatomy NAME:SIZE: model {model.name} has no mask generator; name the anatomy without "
                         "a size (masks from its database) or pass --mask FILE")
    requests = check_size_requests(request.anatomy_sizes)
    table = read_size_table(locate_weight(model, "anatomy_size_conditions", request.weights_dir).path)
    condition = size_condition(requests, table)
    mask_weights = [locate_weight(model, c, request.weights_dir) for c in MASK_COMPONENTS]
    mask_steps = request.mask_steps or int(model.network["mask_generation_noise_scheduler"].get(
        "num_train_timesteps", 1000))
    source = GeneratedMaskSource(
        spec=model, requests=requests, condition=condition, target_tumour=target_tumour_label(condition),
        controlled_ids=tuple(controlled_label_ids(requests)), size=size, spacing=spacing, seed=request.seed,
        steps=mask_steps, device=device, precision=precision, profile=profile,
    )
    return source, source.controlled_ids, mask_weights


# --- running -----------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    unet: Any
    controlnet: Any
    decoder: Any
    scheduler: Any
    weight_hashes: dict[str, dict[str, str]]
    networks: dict[str, Any]  # every loaded network by component, the mask generator's included
    scale_factors: dict[str, Any]  # component → scale factor, for the diffusion UNets
    backend: dict[str, Any] = field(default_factory=lambda: {"name": "torch"})  # engine/backends.py's record


def load_networks(plan: GenerationPlan, on_progress: ProgressCallback) -> LoadedModel:
    """Load every weight file of the plan, one at a time, each from a single read whose bytes are hashed (against
    the lock) and loaded, so the sidecar's sha256 is that of the weights that ran; then hand the mask source what
    it needs."""
    import torch

    from maisi_cli.engine.backends import apply_backend, network_device
    from maisi_cli.engine.decode import LatentDecoder
    from maisi_cli.engine.networks import build_network, build_scheduler
    from maisi_cli.engine.weights import built_and_read, load_verified

    backend = plan.request.backend
    device = torch.device(network_device(backend, plan.device))
    hashes, networks, scale_factors = {}, {}, {}
    for i, weight in enumerate(plan.weights):
        network, read = built_and_read(
            lambda: build_network(plan.model, weight.component, device, plan.precision), weight)
        loaded_weights = load_verified(network, weight, plan.model, read)
        hashes[weight.component] = {"file": weight.repo_name, "path": str(weight.path),
                                    "sha256": loaded_weights.sha256}
        if "scale_factor" in loaded_weights.extras:
            scale_factors[weight.component] = loaded_weights.extras["scale_factor"]
        networks[weight.component] = network.to(device)
        on_progress("load networks", i + 1, len(plan.weights))
    decoder = LatentDecoder(networks["autoencoder"], scale_factors["diffusion_unet"]).to(device)
    swapped, record = apply_backend(backend, plan.model, networks, scale_factors, hashes, plan.device, plan.precision,
                                    plan.request.onnx_dir, on_progress)
    if "mask-unet" in swapped:
        networks["mask_generation_diffusion"] = swapped["mask-unet"]
    if "mask-decoder" in swapped:
        networks["mask_generation_decoder"] = swapped["mask-decoder"]
    loaded = LoadedModel(swapped.get("unet", networks["diffusion_unet"]),
                         swapped.get("controlnet", networks.get("controlnet")), swapped.get("vae-decoder", decoder),
                         build_scheduler(plan.model), hashes, networks, scale_factors, record)
    plan.mask_source.prepare(loaded)
    return loaded


def sample_regions(plan: GenerationPlan, sample_mask: SampleMask) -> tuple[int, int]:
    """(top, bottom) body-region indices: the database entry's, else --body-region's span, else from the labels."""
    regions = region_indices(plan.request.body_regions)
    if sample_mask.regions is not None:
        return sample_mask.regions
    if regions:
        return min(regions), max(regions)
    return body_region_indices(sample_mask.mask.labels)


def condition_inputs(plan: GenerationPlan, sample_mask: SampleMask, device: Any) -> tuple[Any, dict, dict]:
    """(ControlNet condition, UNet extra inputs, ControlNet extra inputs) for one sample's mask. Body regions (ddpm)
    come from the database entry, else from --body-region, else from the labels present."""
    import torch

    from maisi_cli.engine.sampling import (body_region_condition, label_bit_planes, modality_condition,
                                           spacing_condition)

    controlnet_cond = None  # an image-only model (no mask): the UNet runs alone
    if sample_mask.mask is not None:
        # the 1-byte labels go to the device, which makes the 32-byte-a-voxel planes (sampling.label_bit_planes)
        labels = torch.from_numpy(np.ascontiguousarray(sample_mask.mask.labels))[None, None]
        controlnet_cond = label_bit_planes(labels.to(device))
    unet_inputs: dict[str, Any] = {"spacing_tensor": spacing_condition(plan.spacing).to(device)}
    controlnet_inputs: dict[str, Any] = {}
    if plan.model.uses_modality:
        modality = modality_condition(plan.model.modality_id).to(device)
        unet_inputs["class_labels"] = modality
        if controlnet_cond is not None:
            controlnet_inputs["class_labels"] = modality
    if plan.model.uses_body_region:
        top, bottom = sample_regions(plan, sample_mask)
        unet_inputs["top_region_index_tensor"] = body_region_condition(top).to(device)
        unet_inputs["bottom_region_index_tensor"] = body_region_condition(bottom).to(device)
    return controlnet_cond, unet_inputs, controlnet_inputs


def sidecar_document(plan: GenerationPlan, task: SampleTask, loaded: LoadedModel, timings: dict[str, float],
                     mask_provenance: dict[str, Any], qc_record: dict[str, Any] | None = None,
                     regions: tuple[int, int] | None = None) -> dict[str, Any]:
    """The sample's provenance. `task.seed` is the seed of the attempt whose files were kept; `qc_record` is its
    QC report with the list of attempts (None when the check is off, and `qc_skipped` says why)."""
    import monai
    import torch

    return {
        "maisi_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {"image": task.image.name, "label": task.label.name if task.label is not None else None},
        "model": {"name": plan.model.name, "source": plan.model.source, "scheduler": plan.model.scheduler_kind},
        "image_only": plan.model.image_only,
        "modality": plan.model.modality,
        "output_intensity": plan.model.output_intensity,
        "guidance": plan.guidance,
        "weights": loaded.weight_hashes,
        "profile": {"name": plan.profile.name, "path": plan.profile.path},
        "decode": plan.decode.model_dump(),
        "size": list(plan.size),
        "spacing": list(plan.spacing),
        "seed": plan.request.seed,
        "sample_index": task.index,
        "sample_seed": task.seed,
        "anatomy": list(plan.request.anatomy),
        "label_mode": None if plan.model.image_only else plan.request.label_mode,
        "anatomy_sizes": dict(plan.request.anatomy_sizes),
        "mask_source": mask_provenance,
        "body_region": list(regions) if regions is not None else None,
        "steps": plan.steps,
        "device": plan.device,
        "precision": plan.precision,
        "backend": loaded.backend,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "qc": qc_record,
        "qc_skipped": None if qc_record is not None else (
            f"quality check {plan.qc_note}" if plan.qc_note else "quality check disabled (--no-qc)"),
        "versions": {"torch": torch.__version__, "monai": monai.__version__},
        "warnings": list(plan.warnings),
    }


def generate_sample(plan: GenerationPlan, loaded: LoadedModel, task: SampleTask, sample_mask: SampleMask,
                    on_progress: ProgressCallback,
                    attempt: int = 0) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """One sample from `task.seed`: (image int16 — HU, or MR intensities for `output_intensity` "mr" —, label
    uint8 or None for an image-only model, timings). Nothing is written here. `attempt` (a quality-check retry)
    only names the progress stages."""
    import torch

    from maisi_cli.engine.decode import decode_latents
    from maisi_cli.engine.postprocess import output_image, output_labels
    from maisi_cli.engine.sampling import denoise, derive_sample_seed, initial_noise, schedule

    device = torch.device(plan.device)
    controlnet_cond, unet_inputs, controlnet_inputs = condition_inputs(plan, sample_mask, device)
    name = f"sample {task.index:04d}" + (f" retry {attempt}" if attempt else "")
    timings: dict[str, float] = {}

    start = time.perf_counter()
    # fp16 latents on a GPU in fp16, as the reference; fp32 otherwise.
    latent_dtype = torch.float16 if plan.precision == "fp16" else torch.float32
    latents = initial_noise(plan.latent_shape, task.seed).to(device=device, dtype=latent_dtype)
    steps = schedule(loaded.scheduler, plan.steps, plan.latent_shape[1:])
    step_generator = torch.Generator(device=device).manual_seed(derive_sample_seed(task.seed, 1))
    with torch.inference_mode():
        latents = denoise(
            loaded.unet, loaded.controlnet, loaded.scheduler, latents, controlnet_cond, steps, unet_inputs,
            controlnet_inputs, precision=plan.precision,
            on_step=lambda done, total: on_progress(f"{name} denoise", done, total), generator=step_generator,
            guidance_scale=plan.guidance,
        )
    timings["denoise_s"] = time.perf_counter() - start
    del controlnet_cond, unet_inputs, controlnet_inputs  # the decode is the memory peak: free the condition first

    start = time.perf_counter()
    image = decode_latents(loaded.decoder, latents, plan.decode,
                           on_window=lambda done, total: on_progress(f"{name} decode", done, total),
                           precision=plan.precision)
    timings["decode_s"] = time.perf_counter() - start

    decoded = image[0, 0].float().numpy()
    if not np.isfinite(decoded).all():
        bad = int((~np.isfinite(decoded)).sum())
        raise GenerationError(
            f"sample {task.index}: the decoder produced {bad} non-finite voxels (overflow in {plan.precision}); "
            "retry with --precision fp32 or check the weights"
        )
    if sample_mask.mask is None:  # image-only: no body crop, no label file
        return output_image(decoded, plan.model.output_intensity), None, timings
    image = output_image(decoded, plan.model.output_intensity, sample_mask.mask.labels)
    labels = output_labels(sample_mask.mask.labels, plan.request.label_mode, plan.anatomy_ids)
    return image, labels, timings


@dataclass
class CheckedSample:
    task: SampleTask  # with the seed of the kept attempt
    mask: SampleMask  # the kept attempt's condition mask
    image: np.ndarray
    labels: np.ndarray | None  # None: an image-only model
    timings: dict[str, float]
    qc: dict[str, Any] | None  # the kept attempt's QC report and the attempts; None when the check is off
    attempts: list[dict[str, Any]]


def generate_checked_sample(plan: GenerationPlan, loaded: LoadedModel, task: SampleTask,
                            on_progress: ProgressCallback, on_warning: WarningCallback) -> CheckedSample:
    """One sample, checked and re-generated from the next attempt seed while it fails the quality check, up to
    `plan.qc.max_attempts`. The last attempt is kept either way (as the reference saves when it runs out of
    candidates), with a warning. The check runs on the int16 HU image as written, after the body crop, with the
    full condition mask — so `maisi qc` on the written files gives the same report."""
    from maisi_cli.engine.sampling import derive_attempt_seed

    statistics = plan.qc_statistics
    allowed = plan.qc.max_attempts if statistics is not None else 1
    attempts: list[dict[str, Any]] = []
    qc_seconds = 0.0
    for attempt in range(allowed):
        current = task if attempt == 0 else replace(
            task, seed=derive_attempt_seed(plan.request.seed, task.index, attempt))
        sample_mask = plan.mask_source.mask_for(task.index, attempt, on_progress)
        image, labels, timings = generate_sample(plan, loaded, current, sample_mask, on_progress, attempt)
        if statistics is None:
            return CheckedSample(current, sample_mask, image, labels, timings, None, [])
        qc_start = time.perf_counter()
        report = check_quality(image, sample_mask.mask.labels, statistics)
        qc_seconds += time.perf_counter() - qc_start
        attempts.append({"attempt": attempt, "seed": current.seed, "passed": report.passed, "failed": report.failed})
        if report.passed:
            break
    timings["qc_s"] = qc_seconds
    if not report.passed:
        on_warning(f"sample {task.index}: failed the quality check in all {len(attempts)} attempt(s) "
                   f"({report.summary()}); keeping the last attempt (seed {current.seed})")
    record = {**report.as_dict(), "attempt": len(attempts) - 1, "max_attempts": allowed, "attempts": attempts}
    return CheckedSample(current, sample_mask, image, labels, timings, record, attempts)


def recorded_result(task: SampleTask) -> SampleResult:
    """A complete sample skipped by this run, with the seed and QC outcome its sidecar recorded."""
    from maisi_cli.io.provenance import read_json

    document = read_json(task.sidecar) or {}
    qc = document.get("qc") if isinstance(document.get("qc"), dict) else None
    seed = document.get("sample_seed") if isinstance(document.get("sample_seed"), int) else task.seed
    return SampleResult(task.index, seed, "skipped", task.file_names,
                        qc={"passed": bool(qc.get("passed")), "failed": list(qc.get("failed") or [])} if qc else None,
                        attempts=list(qc.get("attempts") or []) if qc else [])


def run_generation(plan: GenerationPlan, on_progress: ProgressCallback | None = None,
                   on_warning: WarningCallback | None = None,
                   on_written: Callable[[SampleTask], None] | None = None) -> GenerationReport:
    """Make the plan's pending samples. `on_written(task)` runs after each sample's files are all written (e.g. to
    write its preview).

    Each sample is made under its lock (engine/locks.py): a sample another live job is making is left to it
    ("locked", with a warning); one that another job finished since the plan was made is "skipped". A sample whose
    generation raises a GenerationError or MaskError is "failed" (a warning; nothing of it is kept) and the run
    goes on with the next. The networks are loaded for the first sample this run makes."""
    from maisi_cli.engine.locks import SampleLock, remove_stale_partials, sample_lock_path
    from maisi_cli.engine.postprocess import ras_affine
    from maisi_cli.engine.run_folder import record_weights, sample_problem, settings_sha256
    from maisi_cli.io.files import removed_if_left_empty, writable_folder
    from maisi_cli.io.nifti import write_nifti
    from maisi_cli.io.provenance import write_json

    on_progress = on_progress or (lambda stage, done, total: None)
    on_warning = on_warning or (lambda message: None)
    started = time.perf_counter()
    run_timings: dict[str, float] = {}
    results = [recorded_result(t) for t in plan.samples if t.complete]
    pending = plan.pending
    loaded: LoadedModel | None = None
    run_digest = settings_sha256(plan)
    with removed_if_left_empty(plan.request.out):  # a run that fails before writing leaves no empty --out
        if pending:
            writable_folder(plan.request.out, "--out")
        for task in pending:
            files = task.file_names
            lock = SampleLock(sample_lock_path(task.sidecar))
            if not lock.acquire():
                on_warning(f"sample {task.index}: another job holds {lock.path.name} and is writing it; left to "
                           "that job")
                results.append(SampleResult(task.index, task.seed, "locked", files))
                continue
            try:
                if not plan.request.overwrite and task.files_exist() and sample_problem(task, run_digest) is None:
                    results.append(recorded_result(task))  # another job finished it after this run was planned
                    continue
                remove_stale_partials(task.paths)  # left by a killed writer
                if loaded is None:
                    load_start = time.perf_counter()
                    loaded = load_networks(plan, on_progress)
                    run_timings["load_s"] = time.perf_counter() - load_start
                    record_weights(plan, loaded.weight_hashes)  # refuses weights other than the folder's run's
                sample_start = time.perf_counter()
                try:
                    sample = generate_checked_sample(plan, loaded, task, on_progress, on_warning)
                except (GenerationError, MaskError) as failure:
                    on_warning(f"sample {task.index}: {failure}; skipped (a re-run retries it)")
                    results.append(SampleResult(task.index, task.seed, "failed", files,
                                                time.perf_counter() - sample_start, error=str(failure)))
                    continue
                timings = sample.timings
                write_start = time.perf_counter()
                affine = sample.mask.mask.affine if sample.mask.mask is not None else ras_affine(plan.spacing)
                try:
                    files_sha256 = {"image": write_nifti(task.image, sample.image, affine)}
                    if task.label is not None and sample.labels is not None:
                        files_sha256["label"] = write_nifti(task.label, sample.labels, affine)
                    timings["write_s"] = time.perf_counter() - write_start
                    timings["total_s"] = time.perf_counter() - sample_start
                    # The sidecar goes last: its presence marks the sample complete for a re-run.
                    write_json(task.sidecar, {**sidecar_document(
                        plan, sample.task, loaded, timings, sample.mask.provenance, sample.qc,
                        sample_regions(plan, sample.mask) if plan.model.uses_body_region else None),
                        "files_sha256": files_sha256, "run_settings_sha256": run_digest})
                except NoSpaceError as failure:
                    complete = sum(r.status in ("written", "skipped") for r in results)
                    raise NoSpaceError(f"{failure}; {complete} sample(s) complete in {plan.request.out} — free space "
                                       "and re-run the same command (it makes only the missing samples)") from None
            finally:
                lock.release()  # after the sidecar: the lock file goes once the sample is complete
            on_progress(f"sample {task.index:04d} write", 1, 1)
            if on_written is not None:
                on_written(task)
            qc = {"passed": sample.qc["passed"], "failed": sample.qc["failed"]} if sample.qc else None
            results.append(SampleResult(task.index, sample.task.seed, "written", files, timings["total_s"],
                                        qc=qc, attempts=sample.attempts,
                                        timings={k: round(v, 3) for k, v in timings.items()}))
    results.sort(key=lambda r: r.index)
    seconds = time.perf_counter() - started
    run_timings["samples_s"] = sum(r.seconds for r in results if r.status in ("written", "failed"))
    run_timings["total_s"] = seconds
    return GenerationReport(plan.describe(), results, seconds, run_timings)


def summary_line(report: GenerationReport) -> str:
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
