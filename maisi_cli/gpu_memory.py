"""Predicted peak GPU memory of one generation: the diffusion loop and the VAE decode under a decode plan.

No torch here (the registries use it through `maisi_cli.decode_plan`): every term is counted from the model spec's
layer shapes (channels per level, residual blocks, spatial sizes, dtype bytes), the decode window and the
tensor-parallel (TP) split count, as MONAI's MAISI classes allocate them under fp16 autocast (reference-inference.md
§2, §6, §7; `autoencoderkl_maisi.py`). The planner that picks the plan is `maisi_cli.decode_plan.plan_decode`; the
checks against a machine's host and GPU memory are `maisi_cli.engine.memory`.

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
which this model does not explain). Table 3's "G" is read as GiB (nvidia-smi / torch units), and so is every
budget. The nine-row comparison is in ``bench/README.md`` and
``bench/results/memory_table3.json``. Refit them on GPU measurements with ``bench/memory_fit.py --measured FILE``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from maisi_cli.config import Triple

GIB = 1024**3
# --- fitted constants (bench/memory_fit.py) -------------------------------------------------------------------
FRAMEWORK_OVERHEAD_GIB = 4.8
TRANSIENT_FACTOR = 1.31
# --------------------------------------------------------------------------------------------------------------

TP_HALO = 3  # MONAI MaisiConvolution's halo on each inner side of a TP chunk; a chunk must be at least that wide
CAT_ON_GPU_BELOW = 500  # MONAI concatenates chunks / GroupNorm groups on the CPU when a side reaches this


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
        for a, b in itertools.pairwise(cond[1:]):
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
        gib = lambda b: round(b / GIB, 3)
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
    `guided`: classifier-free guidance runs the networks on a batch of 2 (twice the step activations, and with a
    ControlNet twice its condition)."""
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
    # guided: batch 2 through the UNet, and with a ControlNet through it too, on two conditions (the mask and the
    # mask without its tumours): twice the step activations, the condition embedding and the conditioning planes
    branches = 2 if guided else 1
    step *= branches
    embed *= branches
    diffusion = {**common, "conditioning planes": 0 if image_only else branches * 8 * image * dtype_bytes,
                 "activations": max(step, embed)}
    if guided and not image_only:
        diffusion["unconditional label map"] = image
    split_axis = int(vae.get("dim_split", 1))
    live, transient = decoder_activation_bytes(vae, plan.roi, plan.tp_splits, split_axis, dtype_bytes,
                                               transient_factor)
    decode = {**common, "activations": live, "transient buffers": transient}
    if plan.mode == "whole":
        decode["decoded image"] = 2 * int(vae["out_channels"]) * image * dtype_bytes  # output and its clip
    return MemoryEstimate(size=size, latent=latent, roi=plan.roi, tp_splits=plan.tp_splits, mode=plan.mode,
                          diffusion_terms=diffusion, decode_terms=decode)

