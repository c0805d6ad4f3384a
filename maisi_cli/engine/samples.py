"""One sample, made in memory: its condition, the denoising, the decode, the HU image and label map, and the
quality check with its retries. Nothing here writes a file (engine/run.py does)."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import monai
import numpy as np
import torch

from maisi_cli._version import __version__
from maisi_cli.engine.decode import decode_latents
from maisi_cli.engine.masks.database import region_indices
from maisi_cli.engine.masks.regions import body_region_indices
from maisi_cli.engine.masks.sources import SampleMask
from maisi_cli.engine.masks.tumours import remove_tumours
from maisi_cli.engine.networks import LoadedModel
from maisi_cli.engine.plan import GenerationPlan, SampleTask
from maisi_cli.engine.postprocess import output_image, output_labels
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.qc import check_quality
from maisi_cli.engine.sampling import (Denoiser, body_region_condition, initial_noise, label_bit_planes,
                                       modality_condition, sample, schedule, spacing_condition)
from maisi_cli.engine.seeds import derive_attempt_seed, derive_sample_seed
from maisi_cli.io.label_maps import label_counts
from maisi_cli.errors import GenerationError

WarningCallback = Callable[[str], None]


def sample_regions(plan: GenerationPlan, sample_mask: SampleMask) -> tuple[int, int]:
    """(top, bottom) body-region indices: the database entry's, else --body-region's span, else from the labels."""
    regions = region_indices(plan.request.body_regions)
    if sample_mask.regions is not None:
        return sample_mask.regions
    if regions:
        return min(regions), max(regions)
    return body_region_indices(sample_mask.mask.labels)


def condition_inputs(plan: GenerationPlan, sample_mask: SampleMask,
                     device: torch.device
                     ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ControlNet condition, UNet extra inputs, ControlNet extra inputs) for one sample's mask. Body regions (ddpm)
    come from the database entry, else from --body-region, else from the labels present."""
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


def unconditional_labels(plan: GenerationPlan, sample_mask: SampleMask) -> np.ndarray | None:
    """Tumour-presence guidance (a guided plan with a condition mask): the mask with its tumours removed by
    upstream's rules (masks/tumours.py), whose bit planes are the unconditional ControlNet condition and whose
    label counts the sidecar records; None otherwise."""
    if plan.guidance is None or sample_mask.mask is None:
        return None
    return remove_tumours(sample_mask.mask.labels)


def denoiser_for(plan: GenerationPlan, loaded: LoadedModel, sample_mask: SampleMask, device: torch.device,
                 unconditional: np.ndarray | None = None) -> Denoiser:
    """The loaded networks with this sample's condition (and, guided, the bit planes of `unconditional`)."""
    controlnet_cond, unet_inputs, controlnet_inputs = condition_inputs(plan, sample_mask, device)
    controlnet_uncond = None
    if unconditional is not None:
        controlnet_uncond = label_bit_planes(torch.from_numpy(np.ascontiguousarray(unconditional))[None, None]
                                             .to(device))
    return Denoiser(loaded.unet, loaded.controlnet, controlnet_cond, unet_inputs, controlnet_inputs,
                    guidance_scale=plan.guidance, controlnet_uncond=controlnet_uncond)


def generate_sample(plan: GenerationPlan, loaded: LoadedModel, task: SampleTask, sample_mask: SampleMask,
                    on_progress: ProgressCallback = no_progress, attempt: int = 0,
                    unconditional: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """One sample from `task.seed`: (image int16 — HU, or MR intensities for `output_intensity` "mr" —, label
    uint8 or None for an image-only model, timings). Nothing is written here. `attempt` (a quality-check retry)
    only marks the progress events; `unconditional`: the guided plan's unconditional mask (unconditional_labels).

    Timings, each stage's seconds: condition_s (the condition's labels to the device and their bit planes, the
    unconditional mask of guidance), denoise_s (the noise, the schedule, the loop, the condition freed), decode_s
    (the VAE decode and its copy to the host), postprocess_s (the finiteness check, HU or MR conversion, body crop,
    label map)."""
    device = torch.device(plan.device)
    timings: dict[str, float] = {}

    def report(stage: str) -> Callable[[int, int], None]:
        return lambda done, total: on_progress(ProgressEvent(stage, done, total, sample=task.index, attempt=attempt))

    start = time.perf_counter()
    denoiser = denoiser_for(plan, loaded, sample_mask, device, unconditional)
    timings["condition_s"] = time.perf_counter() - start
    start = time.perf_counter()
    # fp16 latents on a GPU in fp16, as the reference; fp32 otherwise.
    latent_dtype = torch.float16 if plan.precision == "fp16" else torch.float32
    latents = initial_noise(plan.latent_shape, task.seed).to(device=device, dtype=latent_dtype)
    steps = schedule(loaded.scheduler, plan.steps, plan.latent_shape[1:])
    step_generator = torch.Generator(device=device).manual_seed(derive_sample_seed(task.seed, 1))
    with torch.inference_mode():
        latents = sample(denoiser, loaded.scheduler, latents, steps, precision=plan.precision,
                         on_step=report("denoise"), generator=step_generator)
    del denoiser  # the decode is the memory peak: free the condition first (on a CPU, 4 GiB of planes at 512³)
    timings["denoise_s"] = time.perf_counter() - start

    start = time.perf_counter()
    image = decode_latents(loaded.decoder, latents, plan.decode, on_window=report("decode"),
                           precision=plan.precision)
    timings["decode_s"] = time.perf_counter() - start

    start = time.perf_counter()
    decoded = image[0, 0].float().numpy()
    del image
    bad = non_finite_voxels(decoded)
    if bad:
        raise GenerationError(
            f"sample {task.index}: the decoder produced {bad} non-finite voxels (overflow in {plan.precision}); "
            "retry with --precision fp32 or check the weights"
        )
    if sample_mask.mask is None:  # image-only: no body crop, no label file
        image_out, labels = output_image(decoded, plan.model.output_intensity), None
    else:
        image_out = output_image(decoded, plan.model.output_intensity, sample_mask.mask.labels)
        labels = output_labels(sample_mask.mask.labels, plan.request.label_mode, plan.anatomy_ids)
    timings["postprocess_s"] = time.perf_counter() - start
    return image_out, labels, timings


# The stages of making a sample, in order (the sidecar's timings add write_s, sidecar_s, other_s and total_s):
# mask_s: the condition mask (read and fitted, a database entry resampled, or generated).
SAMPLE_STAGES = ("mask_s", "condition_s", "denoise_s", "decode_s", "postprocess_s", "qc_s")


def non_finite_voxels(decoded: np.ndarray) -> int:
    """How many voxels are NaN or ±inf; 0 after one pass of a finite volume (a block-wise isfinite: no whole-volume
    boolean array)."""
    flat = decoded.reshape(-1)
    block = 1 << 22
    for start in range(0, flat.size, block):
        if not np.isfinite(flat[start:start + block]).all():
            return int(flat.size - np.count_nonzero(np.isfinite(flat)))
    return 0


@dataclass
class CheckedSample:
    task: SampleTask  # with the seed of the kept attempt
    mask: SampleMask  # the kept attempt's condition mask
    image: np.ndarray
    labels: np.ndarray | None  # None: an image-only model
    timings: dict[str, float]
    qc: dict[str, Any] | None  # the kept attempt's QC report and the attempts; None when the check is off
    attempts: list[dict[str, Any]]
    unconditional_counts: dict[str, int] | None = None  # guided: voxels per label of the unconditional mask


def generate_checked_sample(plan: GenerationPlan, loaded: LoadedModel, task: SampleTask,
                            on_progress: ProgressCallback = no_progress,
                            on_warning: WarningCallback = lambda message: None) -> CheckedSample:
    """One sample, checked and re-generated from the next attempt seed while it fails the quality check, up to
    `plan.qc.max_attempts`. The last attempt is kept either way (as the reference saves when it runs out of
    candidates), with a warning. The check runs on the int16 HU image as written, after the body crop, with the
    full condition mask — so `maisi qc` on the written files gives the same report."""
    statistics = plan.qc_statistics
    allowed = plan.qc.max_attempts if statistics is not None else 1
    attempts: list[dict[str, Any]] = []
    # every attempt's stages add up (a retry's denoising is time the sample took); qc_s is 0 with the check off
    timings = dict.fromkeys(SAMPLE_STAGES, 0.0)
    for attempt in range(allowed):
        current = task if attempt == 0 else replace(
            task, seed=derive_attempt_seed(plan.request.seed, task.index, attempt))
        start = time.perf_counter()
        sample_mask = plan.mask_source.mask_for(task.index, attempt, on_progress)
        timings["mask_s"] += time.perf_counter() - start
        start = time.perf_counter()
        unconditional = unconditional_labels(plan, sample_mask)  # once: the condition and the sidecar's counts
        timings["condition_s"] += time.perf_counter() - start
        image, labels, stages = generate_sample(plan, loaded, current, sample_mask, on_progress, attempt,
                                                unconditional)
        for stage, seconds in stages.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        if statistics is None:
            return CheckedSample(current, sample_mask, image, labels, timings, None, [],
                                 label_counts_of(unconditional))
        qc_start = time.perf_counter()
        report = check_quality(image, sample_mask.mask.labels, statistics)
        timings["qc_s"] += time.perf_counter() - qc_start
        attempts.append({"attempt": attempt, "seed": current.seed, "passed": report.passed, "failed": report.failed})
        if report.passed:
            break
    if not report.passed:
        on_warning(f"sample {task.index}: failed the quality check in all {len(attempts)} attempt(s) "
                   f"({report.summary()}); keeping the last attempt (seed {current.seed})")
    record = {**report.as_dict(), "attempt": len(attempts) - 1, "max_attempts": allowed, "attempts": attempts}
    return CheckedSample(current, sample_mask, image, labels, timings, record, attempts,
                         label_counts_of(unconditional))


def sidecar_document(plan: GenerationPlan, task: SampleTask, loaded: LoadedModel, timings: dict[str, float],
                     mask_provenance: dict[str, Any], qc_record: dict[str, Any] | None = None,
                     regions: tuple[int, int] | None = None) -> dict[str, Any]:
    """The sample's provenance. `task.seed` is the seed of the attempt whose files were kept; `qc_record` is its
    QC report with the list of attempts (None when the check is off, and `qc_skipped` says why)."""
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


def checked_sample_sidecar(plan: GenerationPlan, loaded: LoadedModel, sample: CheckedSample,
                           timings: dict[str, float]) -> dict[str, Any]:
    """The sidecar of a checked sample with these timings (engine/run.py adds the sha256 of the files it writes)."""
    regions = sample_regions(plan, sample.mask) if plan.model.uses_body_region else None
    document = sidecar_document(plan, sample.task, loaded, timings, sample.mask.provenance, sample.qc, regions)
    if sample.unconditional_counts is not None:
        document["guidance_unconditional_labels"] = sample.unconditional_counts
    return document


def label_counts_of(labels: np.ndarray | None) -> dict[str, int] | None:
    """Voxels per non-zero label (the unconditional mask's, for the sidecar), or None without a map."""
    if labels is None:
        return None
    counts = label_counts(labels)
    return {str(int(ident)): int(counts[ident]) for ident in np.flatnonzero(counts) if ident != 0}
