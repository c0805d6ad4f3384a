"""GPU memory planner: predicted peak memory of the diffusion loop and of the VAE decode, and the decode plan to use.

No torch here: every term is counted from the model spec's layer shapes (channels per level, residual blocks,
spatial sizes, dtype bytes), the decode window and the tensor-parallel (TP) split count, as MONAI's MAISI classes
allocate them under fp16 autocast (reference-inference.md §2, §6, §7; `autoencoderkl_maisi.py`).

Host memory (the end of this file): `estimate_host_memory` counts, stage by stage, what a generation holds in host
memory (the mask as read and its resampling, the condition planes, on the CPU the networks, the decoded image, the
output arrays and their write buffers); `check_generation_memory` refuses a plan whose peak exceeds the available
host memory (/proc/meminfo, capped by the cgroup) or, on a GPU, the device's memory (`gpu_total_memory`: the one
function that imports torch). MAISI_SKIP_MEMORY_CHECK=1 keeps the estimates and drops the refusals.

Model
-----
Diffusion loop peak (one ControlNet + UNet step, latent of N voxels, image of V = 64·N voxels)::

    overhead + weights(fp32) + autocast fp16 weight copies + conditioning (8 bit planes, fp16, image size)
      + label map (fp32, image size) + latents
      + max( ControlNet condition embedding at image resolution: input + conv output + SiLU output,
             UNet up path, per level: ControlNet residuals + UNet skips still held + incoming h + cat(h, skip)
             + GroupNorm and SiLU outputs in fp32 (autocast runs group_norm in fp32) )

  Attention levels use flash attention (no N² matrix); without it the N²·heads score matrix (fp16) is added.

Decode peak (one decoder call on a window of L latent voxels; ``whole`` = the full latent)::

    overhead + weights + autocast fp16 weight copies + label map + latents (+ the whole-decode output)
      + TRANSIENT_FACTOR · max over the decoder's ops of [ live activations + chunk(op) ]

  The walk follows `MaisiDecoder`: conv_in, (mid blocks), per level ``num_res_blocks`` `MaisiResBlock` s and a
  trilinear ×2 upsample + conv, then GroupNorm + conv_out. Live activations count what MONAI keeps: the block's
  input (held by the caller for the residual), `MaisiGroupNorm3D`'s per-group list plus its `torch.cat` copy (only
  when every spatial side < 500; otherwise it concatenates on the CPU), and for a split convolution all TP chunk
  outputs (with their 3-voxel halos) plus the concatenated copy (again on the CPU at ≥ 500). ``chunk(op)`` is the
  contiguous copy cuDNN makes of one strided TP chunk of the convolution's input (with its halo), so more splits
  lower it; an unsplit convolution reads its input in place. The peak op is the ×2 upsample convolution into the
  last level (input + interpolated tensor + chunk outputs + concatenation), or that level's first GroupNorm.

Fitted constants (``bench/memory_fit.py``, minimax relative error over the nine README Table 3 rows; read in GiB)::

    FRAMEWORK_OVERHEAD_GIB = 4.8   CUDA context, cuDNN/cuBLAS handles and workspaces, the mask-generation networks
                                   the reference also keeps on the GPU
    TRANSIENT_FACTOR       = 1.31  multiplier on the decoder's counted activations: caching-allocator rounding and
                                   fragmentation, cuDNN workspace that grows with the tensors

Largest error 8.3 % (rows 16g 256³ and 24g 512³: the published peaks grow a little with the full latent size,
which this model does not explain). Table 3's "G" is read as GiB (nvidia-smi / torch units), and so is every budget. the nine-row comparison is in ``bench/README.md`` and
``bench/results/memory_table3.json``. Refit them on GPU measurements with ``bench/memory_fit.py --measured FILE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from maisi_cli.config import Triple, format_triple
from maisi_cli.errors import MaisiError, UsageError

GIB = 1024**3
# --- fitted constants (bench/memory_fit.py) -------------------------------------------------------------------
FRAMEWORK_OVERHEAD_GIB = 4.8
TRANSIENT_FACTOR = 1.31
# --------------------------------------------------------------------------------------------------------------

TP_HALO = 3  # MONAI MaisiConvolution's halo on each inner side of a chunk
CAT_ON_GPU_BELOW = 500  # MONAI concatenates chunks / GroupNorm groups on the CPU when a side reaches this
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


# --- spec reading --------------------------------------------------------------------------------------------------
def resolved_definition(spec: Any, component: str) -> dict[str, Any]:
    """A network definition with `@key` references replaced by the spec's top-level constants."""
    definition = spec.definition(component)
    constants = spec.network
    resolved = {}
    for key, value in definition.items():
        if isinstance(value, str) and value.startswith("@"):
            value = constants.get(value[1:], value)
        resolved[key] = value
    return resolved


def _channels(definition: dict[str, Any]) -> list[int]:
    return list(definition.get("num_channels") or definition.get("channels"))


def _per_level(value: Any, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


# --- parameter counts ----------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k**3 + cout


def _linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def vae_parameters(definition: dict[str, Any]) -> int:
    """Parameters of an `AutoencoderKlMaisi` (encoder, quant convs, decoder)."""
    ch = _channels(definition)
    blocks = _per_level(definition.get("num_res_blocks", 2), len(ch))
    cin, cout, lat = int(definition["in_channels"]), int(definition["out_channels"]), int(definition["latent_channels"])

    def res(a: int, b: int) -> int:
        return 2 * a + _conv(a, b) + 2 * b + _conv(b, b) + (_conv(a, b, 1) if a != b else 0)

    total = _conv(cin, ch[0])  # encoder
    prev = ch[0]
    for i, c in enumerate(ch):
        for _ in range(blocks[i]):
            total += res(prev, c)
            prev = c
        if i < len(ch) - 1:
            total += _conv(c, c)
    total += 2 * ch[-1] + _conv(ch[-1], 2 * lat)  # norm_out, conv_out (mu and sigma)
    total += _conv(lat, lat, 1) * 2 + _conv(lat, lat, 1)  # quant_conv_mu, quant_conv_log_sigma, post_quant_conv
    rev = ch[::-1]
    total += _conv(lat, rev[0])  # decoder
    prev = rev[0]
    for i, c in enumerate(rev):
        for _ in range(blocks[::-1][i]):
            total += res(prev, c)
            prev = c
        if i < len(rev) - 1:
            total += _conv(c, c)
    total += 2 * prev + _conv(prev, cout)
    return total


def unet_parameters(definition: dict[str, Any], controlnet: bool = False) -> int:
    """Parameters of a MAISI diffusion UNet (or, with `controlnet`, of its ControlNet: no up path, zero convs and
    the condition embedding instead)."""
    ch = _channels(definition)
    levels = len(ch)
    blocks = _per_level(definition.get("num_res_blocks", 2), levels)
    attention = list(definition.get("attention_levels", [False] * levels))
    c0 = ch[0]
    emb = 4 * c0
    inputs = {"include_spacing_input": 3, "include_top_region_index_input": 4, "include_bottom_region_index_input": 4}
    extra = [width for key, width in inputs.items() if definition.get(key) is True]
    emb_dim = emb * (1 + len(extra))
    total = _conv(int(definition["in_channels"]), c0) + _linear(c0, emb) + _linear(emb, emb)
    total += sum(_linear(width, emb) + _linear(emb, emb) for width in extra)
    if definition.get("num_class_embeds"):
        total += int(definition["num_class_embeds"]) * emb

    def res(a: int, b: int) -> int:
        return 2 * a + _conv(a, b) + _linear(emb_dim, b) + 2 * b + _conv(b, b) + (_conv(a, b, 1) if a != b else 0)

    def attn(c: int) -> int:
        return 2 * c + 4 * _linear(c, c)

    down = res if definition.get("resblock_updown") else (lambda a, b: _conv(a, b))
    skips = [c0]
    prev = c0
    for i, c in enumerate(ch):
        for _ in range(blocks[i]):
            total += res(prev, c) + (attn(c) if attention[i] else 0)
            prev = c
            skips.append(c)
        if i < levels - 1:
            total += down(c, c)
            skips.append(c)
    total += 2 * res(ch[-1], ch[-1]) + (attn(ch[-1]) if attention[-1] else 0)  # middle block
    if controlnet:
        total += sum(_conv(c, c, 1) for c in skips) + _conv(ch[-1], ch[-1], 1)  # zero convs
        cond = [int(definition.get("conditioning_embedding_in_channels", 8)),
                *definition.get("conditioning_embedding_num_channels", (16, 32, 96, 256))]
        total += _conv(cond[0], cond[1])
        for a, b in zip(cond[1:-1], cond[2:]):
            total += _conv(a, a) + _conv(a, b)
        total += _conv(cond[-1], c0)
        return total
    for i, c in reversed(list(enumerate(ch))):
        for _ in range(blocks[i] + 1):
            skip = skips.pop()
            total += res(prev + skip, c) + (attn(c) if attention[i] else 0)
            prev = c
        if i > 0:
            total += down(c, c)
    total += 2 * c0 + _conv(c0, int(definition.get("out_channels", definition["in_channels"])))
    return total


_PARAMETER_CACHE: dict[tuple[str, str, int], dict[str, int]] = {}


def weight_parameters(spec: Any) -> dict[str, int]:
    """Parameter count of each image-generation network of the spec."""
    key = (spec.name, spec.source, id(spec))
    if key not in _PARAMETER_CACHE:
        _PARAMETER_CACHE[key] = _weight_parameters(spec)
    return _PARAMETER_CACHE[key]


def _weight_parameters(spec: Any) -> dict[str, int]:
    parameters = {
        "autoencoder": vae_parameters(resolved_definition(spec, "autoencoder")),
        "diffusion_unet": unet_parameters(resolved_definition(spec, "diffusion_unet")),
    }
    if not getattr(spec, "image_only", False):  # an image-only model loads no ControlNet
        parameters["controlnet"] = unet_parameters(resolved_definition(spec, "controlnet"), controlnet=True)
    return parameters


# --- the estimate ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak GPU memory, in bytes, of the diffusion loop and of the decode, with their terms."""

    size: Triple
    latent: Triple
    roi: Triple
    tp_splits: int
    mode: str
    diffusion_terms: dict[str, int] = field(default_factory=dict)
    decode_terms: dict[str, int] = field(default_factory=dict)

    @property
    def diffusion_bytes(self) -> int:
        return sum(self.diffusion_terms.values())

    @property
    def decode_bytes(self) -> int:
        return sum(self.decode_terms.values())

    @property
    def peak_bytes(self) -> int:
        return max(self.diffusion_bytes, self.decode_bytes)

    @property
    def peak_stage(self) -> str:
        return "decode" if self.decode_bytes >= self.diffusion_bytes else "diffusion"

    def as_dict(self) -> dict[str, Any]:
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        return {
            "size": list(self.size), "latent": list(self.latent), "decode_mode": self.mode, "roi": list(self.roi),
            "tp_splits": self.tp_splits, "peak_gib": gib(self.peak_bytes), "peak_stage": self.peak_stage,
            "diffusion_gib": gib(self.diffusion_bytes), "decode_gib": gib(self.decode_bytes),
            "diffusion_terms_gib": {k: gib(v) for k, v in self.diffusion_terms.items()},
            "decode_terms_gib": {k: gib(v) for k, v in self.decode_terms.items()},
            "constants": {"framework_overhead_gib": FRAMEWORK_OVERHEAD_GIB, "transient_factor": TRANSIENT_FACTOR},
        }


def _decoder_walk(definition: dict[str, Any], roi: Triple, splits: int, split_axis: int,
                  dtype_bytes: int) -> list[tuple[int, int]]:
    """(live activation bytes, one-chunk transient bytes) at each op of one `MaisiDecoder` call on a window."""
    ch = _channels(definition)[::-1]
    blocks = _per_level(definition.get("num_res_blocks", 2), len(ch))[::-1]
    groups = int(definition.get("norm_num_groups", 32))
    lat, out_ch = int(definition["latent_channels"]), int(definition["out_channels"])
    norm_bytes = 2 if definition.get("norm_float16") and dtype_bytes == 2 else dtype_bytes
    events: list[tuple[int, int]] = []
    dims = list(roi)
    largest = [0]

    def size(c: int, b: int = dtype_bytes) -> int:
        return c * math.prod(dims) * b

    def gpu_cat() -> bool:
        return max(dims) < CAT_ON_GPU_BELOW

    def conv(held: int, cin: int, cout: int) -> int:
        """Record a MaisiConvolution; returns its output bytes. `held` = bytes alive besides its input."""
        x, out = size(cin), size(cout)
        halo = 0 if splits <= 1 else TP_HALO if splits == 2 else 2 * TP_HALO  # inner chunks carry two halos
        chunk_side = dims[split_axis] // max(splits, 1) + halo
        elements = max(cin, cout) * math.prod(dims) // dims[split_axis] * chunk_side
        largest[0] = max(largest[0], elements)
        if splits <= 1:
            events.append((held + x + out, 0))
            return out
        axis = dims[split_axis]
        chunks = out * (axis + 2 * TP_HALO * (splits - 1)) // axis
        events.append((held + x + chunks + (out if gpu_cat() else 0), x * (axis // splits + 2 * TP_HALO) // axis))
        return out

    def norm(held: int, c: int) -> int:
        x = size(c)
        # per group: an fp32 copy, the centred and the scaled fp32 tensors, then the output list and its concat
        events.append((held + x + size(c, norm_bytes) * (2 if gpu_cat() else 1) + 3 * size(c, 4) // groups, 0))
        return size(c, norm_bytes)

    def resblock(held: int, cin: int, cout: int) -> None:
        x = size(cin)
        h = norm(held, cin)
        events.append((held + x + 2 * h, 0))  # SiLU
        h = conv(held + x, cin, cout)  # conv1's input is the SiLU output, alive with x
        h = norm(held + x, cout)
        h = size(cout)
        events.append((held + x + 2 * h, 0))
        conv(held + x, cout, cout)
        if cin != cout:
            conv(held + h, cin, cout)  # nin_shortcut on x while h is held
        events.append((held + x + 2 * h + (h if cin != cout else 0), 0))  # out = x + h

    conv(0, lat, ch[0])
    prev = ch[0]
    for i, c in enumerate(ch):
        for _ in range(blocks[i]):
            resblock(0, prev, c)
            prev = c
        if i < len(ch) - 1:
            x = size(prev)
            dims = [d * 2 for d in dims]
            events.append((x + size(prev), 0))  # trilinear ×2
            conv(x, prev, prev)
    norm(0, prev)
    conv(0, prev, out_ch)
    events.append((0, 0, largest[0]))  # type: ignore[arg-type]
    return events


def largest_conv_elements(definition: dict[str, Any], roi: Triple, splits: int, split_axis: int = 1) -> int:
    """Elements of the largest tensor one convolution call (one TP chunk) reads or writes."""
    return _decoder_walk(definition, roi, splits, split_axis, 2)[-1][2]  # type: ignore[misc]


def decoder_activation_bytes(definition: dict[str, Any], roi: Triple, splits: int, split_axis: int = 1,
                             dtype_bytes: int = 2, transient_factor: float | None = None) -> tuple[int, int]:
    """(live activations, transient buffers) at the decoder's peak op for one window."""
    factor = TRANSIENT_FACTOR if transient_factor is None else transient_factor
    events = [e for e in _decoder_walk(definition, roi, splits, split_axis, dtype_bytes) if len(e) == 2]
    live, chunk = max(events, key=lambda e: e[0] + e[1])
    return int(factor * live), int(factor * chunk)


def _unet_activation_bytes(unet: dict[str, Any], controlnet: dict[str, Any], latent: Triple,
                           dtype_bytes: int) -> tuple[int, int]:
    """(peak ControlNet + UNet step activations, ControlNet condition-embedding peak) at the latent size."""
    ch = _channels(unet)
    levels = len(ch)
    blocks = _per_level(unet.get("num_res_blocks", 2), levels)
    n = math.prod(latent)
    voxels = [n // 8**i for i in range(levels)]
    skips = [(ch[0], voxels[0])]
    for i, c in enumerate(ch):
        skips += [(c, voxels[i])] * blocks[i]
        if i < levels - 1:
            skips.append((c, voxels[i + 1]))
    skip_bytes = sum(c * v for c, v in skips) * dtype_bytes
    residuals = skip_bytes + ch[-1] * voxels[-1] * dtype_bytes  # the ControlNet's down + mid residuals
    norm_bytes = 4 if dtype_bytes == 2 else dtype_bytes  # autocast runs group_norm (and so SiLU) in fp32
    attention = list(unet.get("attention_levels", [False] * levels))
    heads = _per_level(unet.get("num_head_channels", 32), levels)
    flash = bool(unet.get("use_flash_attention"))
    peak = 0
    held = list(skips)
    prev = ch[-1]
    for i in reversed(range(levels)):
        for _ in range(blocks[i] + 1):
            c_skip, _v = held.pop()
            v = voxels[i]
            cat = (prev + c_skip) * v
            transient = prev * v * dtype_bytes + cat * dtype_bytes + 2 * cat * norm_bytes
            if attention[i] and not flash and heads[i]:
                transient = max(transient, (ch[i] // heads[i]) * v * v * 2 * dtype_bytes)
            peak = max(peak, residuals + sum(c * vv for c, vv in held) * dtype_bytes + transient)
            prev = ch[i]
    cond = [int(controlnet.get("conditioning_embedding_in_channels", 8)),
            *controlnet.get("conditioning_embedding_num_channels", (16, 32, 96, 256))]
    image = 64 * n
    embed = 2 * cond[1] * image * dtype_bytes  # conv_in output and its SiLU at image resolution
    return peak, embed


def estimate_peak_memory(spec: Any, size: Triple, plan: Any, dtype_bytes: int = 2,
                         overhead_gib: float | None = None, transient_factor: float | None = None,
                         guided: bool = False) -> MemoryEstimate:
    """Peak GPU memory of one generation of `size` with the decode `plan` (a `DecodePlan`), fp16 by default.
    `guided`: classifier-free guidance runs the UNet on a batch of 2 (twice the step activations)."""
    overhead = int((FRAMEWORK_OVERHEAD_GIB if overhead_gib is None else overhead_gib) * GIB)
    vae = resolved_definition(spec, "autoencoder")
    unet = resolved_definition(spec, "diffusion_unet")
    image_only = bool(getattr(spec, "image_only", False))
    controlnet = {} if image_only else resolved_definition(spec, "controlnet")
    latent_shape = spec.latent_shape(size)
    latent: Triple = (latent_shape[1], latent_shape[2], latent_shape[3])
    n = math.prod(latent)
    image = math.prod(size)
    params = weight_parameters(spec)
    weights = 4 * sum(params.values())
    cast_copies = 2 * sum(params.values()) if dtype_bytes == 2 else 0
    # the uint8 label map stays on the GPU until the image is cropped to the body (reference §9.4); none image-only
    label = 0 if image_only else image
    latents = latent_shape[0] * n * dtype_bytes
    common = {"framework overhead": overhead, "weights": weights, "fp16 weight copies": cast_copies,
              "label map": label, "latents": latents}
    step, embed = _unet_activation_bytes(unet, controlnet, latent, dtype_bytes)
    if image_only:  # no condition embedding; the residual term of `step` stays (a small over-estimate)
        embed = 0
    if guided:
        step *= 2
    diffusion = {**common, "conditioning planes": 0 if image_only else 8 * image * dtype_bytes,
                 "activations": max(step, embed)}
    split_axis = int(vae.get("dim_split", 1))
    live, transient = decoder_activation_bytes(vae, plan.roi, plan.tp_splits, split_axis, dtype_bytes,
                                               transient_factor)
    decode = {**common, "activations": live, "transient buffers": transient}
    if plan.mode == "whole":
        decode["decoded image"] = 2 * int(vae["out_channels"]) * image * dtype_bytes  # output and its clip
    return MemoryEstimate(size=size, latent=latent, roi=plan.roi, tp_splits=plan.tp_splits, mode=plan.mode,
                          diffusion_terms=diffusion, decode_terms=decode)


# --- planning ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanCandidate:
    plan: Any  # DecodePlan
    estimate: MemoryEstimate
    cost: float  # decode time relative to a whole, unsplit decode

    @property
    def peak_bytes(self) -> int:
        return self.estimate.peak_bytes


def decode_cost(latent: Triple, plan: Any) -> float:
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
                    tp_choices: Sequence[int] = TP_CHOICES) -> list[Any]:
    """Decode plans to consider: whole; sliding windows with the given ROIs (the profiles' tabled ones) and every
    ROI made of multiples of 16 latent voxels; overlaps ≥ min_overlap; TP splits capped as MONAI allows. Plans
    whose largest convolution chunk exceeds 2^31 elements (cuDNN's 32-bit indexing) are left out.

    Overlap changes time and seams, not memory, so the fastest plan always takes the smallest allowed overlap:
    `min_overlap` (the profile's, 0.4 by default as the reference's 24g/32g/80g files) is the quality floor.
    Measured (bench/seams_cpu.py, engine/seams.py): the tile-seam excess falls ~6x from overlap 0 to 0.4 and barely
    moves from 0.4 to 0.5; 0.25 leaves about twice the seam of 0.4 (small windows: an upper bound)."""
    from maisi_cli.profiles import make_decode_plan

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
    plans: dict[tuple, Any] = {}
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
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match or (match.group(2) == "" and match.group(3) not in (None, "b")):
        raise UsageError(f"{field_name}: '{text}' is not a memory size; write e.g. 24g, 80GiB or a byte count")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1:
        raise UsageError(f"{field_name}: '{text}' must be more than zero")
    return int(value)


# --- host memory ---------------------------------------------------------------------------------------------------
# Host bytes per voxel of each step, measured on the CPU as the rise of peak resident memory (VmHWM) over it
# (bench/host_memory.py, 64³–256³ volumes; the measured figure in brackets), rounded up:
MASK_FIT_BYTES = 4  # fit_to_grid's int16 copy and its RAS reorientation, per voxel of the mask as read [3.0]
RESAMPLE_BYTES = 32  # MONAI Spacing, per voxel of the resampled grid: its affine_grid sampling grid and output [28.8]
PAD_CROP_BYTES = 8  # ResizeWithPadOrCrop's float32 output and its rounding, per voxel of the output grid [7.2]
BIT_PLANE_BYTES = 34  # label_bit_planes on the CPU: 8 fp32 planes and a plane's uint8 temporaries [30.1]
OUTPUT_BYTES = 16  # output_image + output_labels: float32 HU temporaries, the int16 image, the uint8 labels [15.9]
WRITE_BYTES = 6  # nifti_bytes of the int16 image: its NIfTI bytes, their copy out of BytesIO, the gzip output [5.3]
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
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        return {"peak_gib": gib(self.peak_bytes), "peak_stage": self.peak_stage,
                "stages_gib": {stage: {k: gib(v) for k, v in terms.items()} for stage, terms in self.stages.items()}}


def estimate_host_memory(spec: Any, size: Triple, plan: Any, on_gpu: bool, dtype_bytes: int = 4,
                         mask: MaskGrid | None = None, guided: bool = False) -> HostMemoryEstimate:
    """Peak host memory of a generation of `size` with the decode `plan`, stage by stage. On the CPU the networks
    run in host memory: their weights and activations are `estimate_peak_memory`'s terms at `dtype_bytes`, without
    the CUDA framework overhead. On a GPU the host holds the weights while they load, the 1-byte condition labels
    it sends (the planes are made on the GPU), and the decoded image from the decode on."""
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
        # on a GPU the 1-byte labels are sent as they are and the planes are made there (pipeline.condition_inputs)
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
    for terms in stages.values():
        terms["libraries and allocator slack"] = HOST_RESERVE
    return HostMemoryEstimate(stages)


def memory_check_skipped() -> bool:
    import os

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
    import os

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
    """Total memory of the CUDA `device` in bytes (torch.cuda.mem_get_info; torch is imported only here)."""
    import torch

    index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
    return int(torch.cuda.mem_get_info(index)[1])


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


def check_generation_memory(spec: Any, size: Triple, plan: Any, device: str, precision: str, profile: str,
                            guided: bool = False, mask: MaskGrid | None = None) -> HostMemoryEstimate:
    """The host estimate of a planned generation, refused (UsageError naming --size) when its peak exceeds the
    available host memory; on a GPU, the GPU estimate is also checked against the device's total memory."""
    dtype_bytes = 4 if precision == "fp32" else 2
    on_gpu = device.startswith("cuda")
    host = estimate_host_memory(spec, size, plan, on_gpu, dtype_bytes, mask, guided)
    check_host_memory(host.peak_bytes, "--size", f"{format_triple(size)} voxels ({host.peak_stage}: "
                      f"{host.largest_term})", "ask for a smaller --size")
    if on_gpu and not memory_check_skipped():
        gpu = estimate_peak_memory(spec, size, plan, dtype_bytes=dtype_bytes, guided=guided)
        check_gpu_memory(gpu, device, gpu_total_memory(device), precision, profile)
    return host
