"""How the VAE decodes one latent: the decode plan (whole, or a sliding window over the latent grid with
tensor-parallel splits) and the planner that finds the fastest plan fitting a GPU memory budget.

The registries use it (profiles.py: a profile's table rows and fallback rule are plans; a GPU profile plans the sizes
missing from its table), and so does the engine (decode.py runs a plan, memory.py checks it against the machine):
so no torch and no engine here. The memory model the planner asks is `maisi_cli.gpu_memory`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from maisi_cli.config import Triple, format_triple
from maisi_cli.errors import MaisiError, UsageError
from maisi_cli.gpu_memory import (
    CAT_ON_GPU_BELOW,
    GIB,
    TP_HALO,
    MemoryEstimate,
    estimate_peak_memory,
    largest_conv_elements,
    resolved_definition,
)

OVERLAPS = (0.25, 0.4, 0.5, 0.6666)
TP_CHOICES = (1, 2, 4, 8)
# Relative decode time: a TP split costs its halo plus about 5 % per extra chunk (monai-facts.md §3: 4 splits were
# 14 % slower than none); each sliding window adds a fixed cost worth this many latent voxels (launch, blending on
# the CPU, the copy back); a CPU-side concatenation (a side ≥ 500) is slow: its decode costs this factor more.
SPLIT_COST = 0.05
ROI_STEP = 16  # candidate sliding-window sides: multiples of 16 latent voxels (as the released profiles use)
MAX_CONV_ELEMENTS = 2**31 - 1  # cuDNN indexes a convolution's input/output with 32 bits: what TP splits are for
WINDOW_COST_VOXELS = 16_384
CPU_CAT_COST = 1.5


# --- the plan: MONAI's sliding-window and tensor-parallel rules ---------------------------------------------------
class DecodePlan(BaseModel):
    """How the VAE decodes one latent: whole, or by sliding window over the latent grid."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["whole", "sliding"]
    roi: Triple  # latent voxels, already clipped to the latent
    overlap: float
    tp_splits: int  # after capping to what the latent allows
    requested_tp_splits: int
    windows: int
    rule: str


def fallback_roi(latent: Triple, budget: int) -> Triple:
    """The largest ROI (multiples of 16, clipped to the latent) with at most `budget` voxels, grown evenly."""
    if math.prod(latent) <= budget:
        return latent
    roi = [min(16, s) for s in latent]
    grown = True
    while grown:
        grown = False
        for axis in sorted(range(3), key=lambda a: roi[a]):  # grow the smallest axis first: near-cubic windows
            if roi[axis] >= latent[axis]:
                continue
            trial = roi.copy()
            trial[axis] = min(roi[axis] + 16, latent[axis])
            if math.prod(trial) <= budget:
                roi = trial
                grown = True
    return (roi[0], roi[1], roi[2])


def window_count(latent: Triple, roi: Triple, overlap: float) -> int:
    """Number of sliding windows MONAI places (its scan-interval rule, last start pulled back to fit)."""
    count = 1
    for size, r in zip(latent, roi):
        interval = r if r == size else max(int(r * (1 - overlap)), 1)
        count *= math.ceil((size - r) / interval) + 1 if size > r else 1
    return count


def cap_tp_splits(requested: int, axis_length: int) -> int:
    """The most tensor-parallel splits ≤ requested that MONAI's MaisiConvolution handles exactly on this axis.

    Measured: a split is exact only when it divides the axis (otherwise the last chunk is mis-trimmed) and each
    chunk keeps at least the 3-voxel halo (otherwise conv3d fails on an empty chunk).
    """
    for splits in range(max(requested, 1), 1, -1):
        if axis_length % splits == 0 and axis_length // splits >= TP_HALO:
            return splits
    return 1


def make_decode_plan(latent: Triple, roi: Triple, overlap: float, tp_splits: int, split_axis: int = 1,
                     rule: str = "") -> DecodePlan:
    """The reference `dynamic_infer` rule: decode whole when the latent has no more voxels than the ROI, else slide
    a window clipped to the latent. TP splits act on spatial axis `split_axis` of what the decoder sees."""
    if math.prod(latent) <= math.prod(roi):
        mode, clipped, windows = "whole", latent, 1
    else:
        clipped = (min(roi[0], latent[0]), min(roi[1], latent[1]), min(roi[2], latent[2]))
        mode, windows = "sliding", window_count(latent, clipped, overlap)
    return DecodePlan(
        mode=mode, roi=clipped, overlap=overlap, tp_splits=cap_tp_splits(tp_splits, clipped[split_axis]),
        requested_tp_splits=tp_splits, windows=windows, rule=rule,
    )


# --- the planner: the fastest plan that fits a memory budget -----------------------------------------------------
@dataclass(frozen=True)
class PlanCandidate:
    plan: DecodePlan
    estimate: MemoryEstimate
    cost: float  # decode time relative to a whole, unsplit decode

    @property
    def peak_bytes(self) -> int:
        return self.estimate.peak_bytes


def decode_cost(latent: Triple, plan: DecodePlan) -> float:
    """Relative decode time: latent voxels processed (windows × window, overlap included) × split overhead, plus
    a fixed cost per window; 1.0 is a whole decode without splits."""
    axis_scale = 1.0
    window = math.prod(plan.roi)
    splits = plan.tp_splits
    if splits > 1:
        axis = plan.roi[1] * 4
        axis_scale = (axis + 2 * TP_HALO * (splits - 1)) / axis * (1 + SPLIT_COST * (splits - 1))
    voxels = plan.windows * window + (WINDOW_COST_VOXELS * plan.windows if plan.mode == "sliding" else 0)
    if max(plan.roi) * 4 >= CAT_ON_GPU_BELOW and splits > 1:
        axis_scale *= CPU_CAT_COST
    return voxels * axis_scale / math.prod(latent)


def _axis_choices(length: int, tile: int) -> list[int]:
    values = {length}
    values.update(v for v in range(tile, length, tile))
    return sorted(values)


def candidate_plans(spec: Any, size: Triple, rois: Sequence[Triple] = (), min_overlap: float = 0.4,
                    tp_choices: Sequence[int] = TP_CHOICES) -> list[DecodePlan]:
    """Decode plans to consider: whole; sliding windows with the given ROIs (the profiles' tabled ones) and every
    ROI made of multiples of 16 latent voxels; overlaps ≥ min_overlap; TP splits capped as MONAI allows. Plans
    whose largest convolution chunk exceeds 2^31 elements (cuDNN's 32-bit indexing) are left out.

    Overlap changes time and seams, not memory, so the fastest plan always takes the smallest allowed overlap:
    `min_overlap` (the profile's, 0.4 by default as the reference's 24g/32g/80g files) is the quality floor.
    Measured (bench/seams_cpu.py, engine/seams.py): the tile-seam excess falls ~6x from overlap 0 to 0.4 and barely
    moves from 0.4 to 0.5; 0.25 leaves about twice the seam of 0.4 (small windows: an upper bound)."""
    latent_shape = spec.latent_shape(size)
    latent: Triple = (latent_shape[1], latent_shape[2], latent_shape[3])
    vae = resolved_definition(spec, "autoencoder")
    split_axis = int(vae.get("dim_split", 1))
    allowed: dict[tuple, bool] = {}
    tile = ROI_STEP
    roi_set = {latent}
    for roi in rois:
        roi_set.add((min(roi[0], latent[0]), min(roi[1], latent[1]), min(roi[2], latent[2])))
    axes = [_axis_choices(s, tile) for s in latent]
    roi_set.update((a, b, c) for a in axes[0] for b in axes[1] for c in axes[2])
    overlaps = [o for o in OVERLAPS if o >= min_overlap - 1e-9] or [min_overlap]
    plans: dict[tuple, DecodePlan] = {}
    for roi in sorted(roi_set):
        for tp in tp_choices:
            for overlap in overlaps if roi != latent else [overlaps[0]]:
                plan = make_decode_plan(latent, roi, overlap, tp, split_axis, rule="planner")
                key = (plan.roi, plan.tp_splits)
                if key not in allowed:
                    allowed[key] = largest_conv_elements(vae, plan.roi, plan.tp_splits, split_axis) <= MAX_CONV_ELEMENTS
                if not allowed[key]:
                    continue
                plans.setdefault((plan.mode, plan.roi, plan.overlap, plan.tp_splits), plan)
    return list(plans.values())


def plan_decode(spec: Any, size: Triple, budget_bytes: int, rois: Sequence[Triple] = (), min_overlap: float = 0.4,
                tp_choices: Sequence[int] = TP_CHOICES, rule: str = "planner") -> PlanCandidate:
    """The fastest decode plan whose predicted peak (diffusion loop and decode) fits `budget_bytes`.

    Raises MaisiError when nothing fits, naming the smallest budget that would."""
    candidates = evaluate_plans(spec, size, rois, min_overlap, tp_choices)
    fitting = [c for c in candidates if c.peak_bytes <= budget_bytes]
    if not fitting:
        smallest = min(candidates, key=lambda c: (c.peak_bytes, c.cost))
        raise MaisiError(
            f"--memory: no decode plan for {format_triple(size)} fits {budget_bytes / GIB:.1f} GiB; the smallest "
            f"predicted peak is {smallest.peak_bytes / GIB:.1f} GiB ({smallest.estimate.peak_stage}, ROI "
            f"{format_triple(smallest.plan.roi)}, {smallest.plan.tp_splits} TP splits): give at least "
            f"{math.ceil(smallest.peak_bytes / GIB * 10) / 10:.1f} GiB or a smaller --size"
        )
    best = min(fitting, key=lambda c: (round(c.cost, 9), c.peak_bytes))
    plan = best.plan.model_copy(update={"rule": rule})
    return PlanCandidate(plan=plan, estimate=best.estimate, cost=best.cost)


def evaluate_plans(spec: Any, size: Triple, rois: Sequence[Triple] = (), min_overlap: float = 0.4,
                   tp_choices: Sequence[int] = TP_CHOICES) -> list[PlanCandidate]:
    """Every candidate plan with its memory estimate and relative cost."""
    latent_shape = spec.latent_shape(size)
    latent: Triple = (latent_shape[1], latent_shape[2], latent_shape[3])
    cache: dict[tuple, MemoryEstimate] = {}
    out = []
    for plan in candidate_plans(spec, size, rois, min_overlap, tp_choices):
        key = (plan.mode, plan.roi, plan.tp_splits)
        if key not in cache:
            cache[key] = estimate_peak_memory(spec, size, plan)
        out.append(PlanCandidate(plan=plan, estimate=cache[key], cost=decode_cost(latent, plan)))
    return out


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(text: str, field_name: str = "--memory") -> int:
    """'24g', '24GiB', '24gb', '1.5t', '512m' or a byte count → bytes. Units are binary (as nvidia-smi and torch
    report: 24g = 24 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match or (match.group(2) == "" and match.group(3) not in (None, "b")):
        raise UsageError(f"{field_name}: '{text}' is not a memory size; write e.g. 24g, 80GiB or a byte count")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1:
        raise UsageError(f"{field_name}: '{text}' must be more than zero")
    return int(value)

