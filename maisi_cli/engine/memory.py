"""Memory checks against the machine a generation runs on, and the profile `auto` picks for it.

Host memory: `estimate_host_memory` counts, stage by stage, what a generation holds in host memory (the mask as read
and its resampling, the condition planes, on the CPU the networks, the decoded image, the output arrays and their
write buffers); `check_generation_memory` refuses a plan whose peak exceeds the available host memory
(/proc/meminfo, capped by the cgroup) or, on a GPU, the device's memory (the GPU model is `maisi_cli.gpu_memory`,
the decode planner `maisi_cli.decode_plan`). MAISI_SKIP_MEMORY_CHECK=1 keeps the estimates and drops the refusals.
Only `gpu_total_memory` and `gpu_free_memory` import torch, when they run: the CLI imports this module for plans
that never touch a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from maisi_cli.config import Triple, format_triple
from maisi_cli.decode_plan import DecodePlan
from maisi_cli.errors import UsageError
from maisi_cli.gpu_memory import GIB, MemoryEstimate, estimate_peak_memory, weight_parameters
from maisi_cli.profiles import Profile, auto_gpu_profile, get_profile

# --- host memory ---------------------------------------------------------------------------------------------------
# Host bytes per voxel of each step, measured on the CPU as the rise of peak resident memory (VmHWM) over it
# (bench/host_memory.py, 64³–256³ volumes; the measured figure in brackets), rounded up:
MASK_FIT_BYTES = 4  # fit_to_grid's int16 copy and its RAS reorientation, per voxel of the mask as read [3.0]
RESAMPLE_BYTES = 32  # MONAI Spacing, per voxel of the resampled grid: its affine_grid sampling grid and output [28.8]
PAD_CROP_BYTES = 8  # ResizeWithPadOrCrop's float32 output and its rounding, per voxel of the output grid [7.2]
BIT_PLANE_BYTES = 34  # label_bit_planes on the CPU: 8 fp32 planes and a plane's uint8 temporaries [30.1]
OUTPUT_BYTES = 6  # output_image (slab by slab: no float32 temporaries) + output_labels: int16 image, uint8 labels [5.1]
WRITE_BYTES = 6  # nifti_bytes of the int16 image: its NIfTI bytes, their copy out of BytesIO, the gzip output [5.8]
# A run of several samples writes each in the background while it makes the next (engine/run.py SampleWriter): the
# sample being written (its int16 image, uint8 labels and write buffers) is held beside every stage of the next.
BACKGROUND_WRITE_BYTES = 3 + WRITE_BYTES
HOST_RESERVE = 256 * 1024**2  # libraries first imported mid-run (MONAI transforms: ~100 MB) and allocator slack
GPU_ESTIMATE_MARGIN = 0.9  # refuse a GPU only when 90 % of the estimate exceeds it: its largest error is 8.3 %
SKIP_MEMORY_CHECK = "MAISI_SKIP_MEMORY_CHECK"  # =1: estimate, but never refuse (an estimate can be wrong)


@dataclass(frozen=True)
class MaskGrid:
    """A condition mask as its header describes it, before its voxels are read."""

    shape: Triple
    itemsize: int  # bytes per voxel as read
    floating: bool  # float values: the whole-number check makes a rounded copy and a finiteness mask
    resampled: Triple | None  # the grid MONAI Spacing makes at the target spacing; None: the spacing already matches


def mask_stage_terms(mask: MaskGrid, size: Triple) -> dict[str, int]:
    """Host bytes alive at the peak of reading a mask and fitting it to `size` (masks/user.py
    `load_condition_mask`): the array as read, its uint8 labels, and fit_to_grid's copies."""
    voxels = math.prod(mask.shape)
    terms = {"mask as read": voxels * mask.itemsize, "mask as uint8": voxels,
             # np.rint's copy, and the isfinite and array_equal boolean masks
             "mask label check": voxels * (mask.itemsize + 2) if mask.floating else 0,
             "mask reorientation": MASK_FIT_BYTES * voxels,
             "mask resampling": RESAMPLE_BYTES * math.prod(mask.resampled) if mask.resampled else 0,
             "mask pad/crop": PAD_CROP_BYTES * math.prod(size)}
    return {k: v for k, v in terms.items() if v}


@dataclass(frozen=True)
class HostMemoryEstimate:
    """Predicted peak host (CPU) memory of one generation, in bytes: the terms alive at each stage's peak."""

    stages: dict[str, dict[str, int]]

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda stage: sum(self.stages[stage].values()))

    @property
    def peak_bytes(self) -> int:
        return sum(self.stages[self.peak_stage].values())

    @property
    def largest_term(self) -> str:
        terms = self.stages[self.peak_stage]
        return max(terms, key=terms.__getitem__)

    def as_dict(self) -> dict[str, Any]:
        def gib(count: int) -> float:
            return round(count / GIB, 3)

        return {"peak_gib": gib(self.peak_bytes), "peak_stage": self.peak_stage,
                "stages_gib": {stage: {k: gib(v) for k, v in terms.items()} for stage, terms in self.stages.items()}}


def estimate_host_memory(spec: Any, size: Triple, plan: DecodePlan, on_gpu: bool, dtype_bytes: int = 4,
                         mask: MaskGrid | None = None, guided: bool = False, samples: int = 1) -> HostMemoryEstimate:
    """Peak host memory of a generation of `size` with the decode `plan`, stage by stage. On the CPU the networks
    run in host memory: their weights and activations are `estimate_peak_memory`'s terms at `dtype_bytes`, without
    the CUDA framework overhead. On a GPU the host holds the weights while they load, the 1-byte condition labels
    it sends (the planes are made on the GPU), and the decoded image from the decode on. With `samples` above 1,
    the sample being written in the background is held beside each stage of the next one."""
    image = math.prod(size)
    image_only = bool(getattr(spec, "image_only", False))
    held = {} if image_only else {"condition mask": image}  # uint8, kept by the mask source all along
    sliding = plan.mode != "whole"
    # whole: the decoder's output and its clipped copy; sliding: MONAI's float32 output and weight maps on the CPU
    decoded = {"decoded image (float32)": (12 if sliding else 8) * image}
    stages: dict[str, dict[str, int]] = {}
    if mask is not None:
        stages["mask"] = mask_stage_terms(mask, size)
    if not image_only:
        # on a GPU the 1-byte labels are sent as they are and the planes are made there
        # (engine/samples.condition_inputs)
        stages["condition"] = {**held, "condition labels (uint8) for the GPU": image} if on_gpu else {
            **held, "condition bit planes": BIT_PLANE_BYTES * image}
    if on_gpu:
        stages["load"] = {**held, "network weights": 4 * sum(weight_parameters(spec).values())}
        stages["decode"] = {**held, **decoded}
    else:
        networks = estimate_peak_memory(spec, size, plan, dtype_bytes=dtype_bytes, overhead_gib=0, guided=guided)
        stages["diffusion"] = {k: v for k, v in networks.diffusion_terms.items() if k != "framework overhead"}
        decode_terms = {k: v for k, v in networks.decode_terms.items() if k not in ("framework overhead",
                                                                                     "decoded image")}
        stages["decode"] = {**decode_terms, **decoded}
    stages["output"] = {**held, "decoded image (float32)": 4 * image,
                        "output arrays and temporaries": OUTPUT_BYTES * image}
    stages["write"] = {**held, "output arrays": 3 * image, "write buffers": WRITE_BYTES * image}
    for stage, terms in stages.items():
        if samples > 1 and stage != "load":  # the networks load before the first sample: nothing is written yet
            terms["previous sample being written"] = BACKGROUND_WRITE_BYTES * image
        terms["libraries and allocator slack"] = HOST_RESERVE
    return HostMemoryEstimate(stages)


def memory_check_skipped() -> bool:
    return os.environ.get(SKIP_MEMORY_CHECK, "").strip() not in ("", "0")


MEMINFO = "/proc/meminfo"
# (folder, limit file, usage file, memory.stat key of reclaimable page cache): cgroup v2, then v1
CGROUP_MEMORY = (("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                 ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _read_number(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat_value(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (a batch job's or a container's): the limit less the
    usage that cannot be reclaimed (inactive page cache can); None when there is no limit."""
    for folder, limit_name, usage_name, inactive_key in CGROUP_MEMORY:
        limit, usage = _read_number(f"{folder}/{limit_name}"), _read_number(f"{folder}/{usage_name}")
        if limit is None or usage is None or limit >= 2**60:  # v1 says "no limit" with a huge number
            continue
        return max(0, limit - usage + _stat_value(f"{folder}/memory.stat", inactive_key))
    return None


def available_host_memory() -> int | None:
    """Bytes the run can still allocate without swapping: MemAvailable of /proc/meminfo (else the free pages),
    capped by the cgroup's room; None where nothing can be read (the check is then skipped)."""
    available = _stat_value(MEMINFO, "MemAvailable:") * 1024 or None  # "MemAvailable:   23944364 kB"
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            available = None
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


def check_host_memory(needed: int, field_name: str, subject: str, fix: str) -> None:
    """Raise a UsageError when `needed` bytes exceed the available host memory, saying both and the fix. Skipped
    with MAISI_SKIP_MEMORY_CHECK=1, or where the available memory cannot be read."""
    available = available_host_memory()
    if available is None or needed <= available or memory_check_skipped():
        return
    raise UsageError(f"{field_name}: {subject} needs about {needed / GIB:.1f} GiB of host memory but "
                     f"{available / GIB:.1f} GiB is available; {fix} (or set {SKIP_MEMORY_CHECK}=1 to try anyway)")


def gpu_total_memory(device: str) -> int:
    """Total memory of the CUDA `device` in bytes (torch.cuda.mem_get_info)."""
    import torch  # only on a GPU run: this module is imported by plans that never touch torch

    index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
    return int(torch.cuda.mem_get_info(index)[1])


def gpu_free_memory(device: str) -> int:
    """Free memory of the CUDA `device` in bytes (torch.cuda.mem_get_info)."""
    import torch  # only on a GPU run: this module is imported by plans that never touch torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def resolve_profile(name_or_path: str, device: str) -> Profile:
    """`auto` → `cpu` on a CPU device, else the profile that fits the free memory of the chosen GPU."""
    if name_or_path != "auto":
        return get_profile(name_or_path)
    if not device.startswith("cuda"):
        return get_profile("cpu")
    return auto_gpu_profile(gpu_free_memory(device))


def check_gpu_memory(estimate: MemoryEstimate, device: str, total: int, precision: str, profile: str) -> None:
    """Raise a UsageError when the predicted GPU peak cannot fit the device's `total` memory even allowing for
    the estimate's error (GPU_ESTIMATE_MARGIN). Skipped with MAISI_SKIP_MEMORY_CHECK=1."""
    if estimate.peak_bytes * GPU_ESTIMATE_MARGIN <= total or memory_check_skipped():
        return
    raise UsageError(
        f"--size: {format_triple(estimate.size)} needs about {estimate.peak_bytes / GIB:.1f} GiB of GPU memory "
        f"({estimate.peak_stage}, {precision}, profile {profile}'s decode plan) but {device} has "
        f"{total / GIB:.1f} GiB; ask for a smaller --size, or --profile auto to plan the decode for this GPU "
        f"(or set {SKIP_MEMORY_CHECK}=1 to try anyway)"
    )


def check_generation_memory(spec: Any, size: Triple, plan: DecodePlan, device: str, precision: str, profile: str,
                            guided: bool = False, mask: MaskGrid | None = None, samples: int = 1) -> HostMemoryEstimate:
    """The host estimate of a planned generation of `samples` samples, refused (UsageError naming --size) when its
    peak exceeds the available host memory; on a GPU, the GPU estimate is also checked against the device's total
    memory."""
    dtype_bytes = 4 if precision == "fp32" else 2
    on_gpu = device.startswith("cuda")
    host = estimate_host_memory(spec, size, plan, on_gpu, dtype_bytes, mask, guided, samples)
    check_host_memory(host.peak_bytes, "--size", f"{format_triple(size)} voxels ({host.peak_stage}: "
                      f"{host.largest_term})", "ask for a smaller --size")
    if on_gpu and not memory_check_skipped():
        gpu = estimate_peak_memory(spec, size, plan, dtype_bytes=dtype_bytes, guided=guided)
        check_gpu_memory(gpu, device, gpu_total_memory(device), precision, profile)
    return host
