"""Diffusion sampling for MAISI: seeds, noise, conditioning tensors and the ControlNet + UNet denoising loop (or,
for an image-only model, the UNet alone, optionally with classifier-free guidance on the modality class).

Numerics follow the reference `scripts/sample.py::ldm_conditional_sample_one_image` (reference-inference.md §5–§6):
noise in fp32 on the CPU, the RFlow schedule of MONAI's `RFlowScheduler` with the latent voxel count, spacing ×100,
the modality class label to both networks, the label map as 8 bit planes, least significant first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler

from maisi_cli.engine.seeds import derive_attempt_seed, derive_sample_seed  # noqa: F401  (re-exported)


def initial_noise(latent_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(1, C, x, y, z) standard normal noise, drawn in fp32 on the CPU from the sample's own generator, so it is
    the same on every device (the reference's `torch.manual_seed(S); torch.randn(...)` for S = seed)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((1, *latent_shape), generator=generator, dtype=torch.float32, device="cpu")


def label_bit_planes(label_map: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """(N, 1, X, Y, Z) integer labels → (N, bits, X, Y, Z) float32 planes on the labels' device; channel k holds
    bit k (LSB first).

    Built one plane at a time from 1-byte labels into the float32 output, so the planes (4·bits bytes a voxel) are
    the only large allocation: broadcasting int64 shifts over the whole volume held 136 bytes a voxel, 17 GiB of
    host memory at 512³. The engine (samples.condition_inputs) therefore sends the 1-byte labels to the GPU and makes the planes there."""
    if label_map.dtype.is_floating_point:
        label_map = label_map.to(torch.int64)
    if label_map.numel() and (int(label_map.min()) < 0 or int(label_map.max()) >= 2**bits):
        raise ValueError(f"label values must be in [0, {2**bits - 1}] for {bits} bit planes")
    labels = label_map[:, 0].to(torch.uint8 if bits <= 8 else torch.int64)
    planes = torch.empty((label_map.shape[0], bits, *label_map.shape[2:]), dtype=torch.float32,
                         device=label_map.device)
    for bit in range(bits):
        planes[:, bit] = (labels >> bit) & 1
    return planes


def spacing_condition(spacing: tuple[float, float, float]) -> torch.Tensor:
    """Spacing in mm ×100, shape (1, 3), as the UNet was trained with."""
    return torch.tensor([spacing], dtype=torch.float32) * 1e2


def modality_condition(modality_id: int) -> torch.Tensor:
    """The modality class label, shape (1,), int64 (1 = CT)."""
    return torch.tensor([modality_id], dtype=torch.long)


def body_region_condition(region_index: int) -> torch.Tensor:
    """A one-hot 4-vector ×100, shape (1, 4): 0 head/neck, 1 chest, 2 abdomen, 3 pelvis/lower (ddpm inputs)."""
    onehot = torch.zeros((1, 4), dtype=torch.float32)
    onehot[0, region_index] = 100.0
    return onehot


def rflow_timesteps(scheduler: Any, steps: int, latent_spatial: tuple[int, int, int]) -> list[tuple[Any, Any]]:
    """(t, next_t) pairs: MONAI's timestep transform over the latent voxel count, float16 values, next_t ending
    at 0. MONAI's `step` truncates next_t with int(), so the steps sum to slightly over 1 — kept for parity with
    the released weights' reference sampler."""
    scheduler.set_timesteps(num_inference_steps=steps, input_img_size_numel=int(np.prod(latent_spatial)))
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat((timesteps[1:], torch.tensor([0], dtype=timesteps.dtype)))
    return list(zip(timesteps, next_timesteps))


def ddpm_timesteps(scheduler: Any, steps: int) -> list[tuple[Any, Any]]:
    scheduler.set_timesteps(num_inference_steps=steps)
    return [(t, None) for t in scheduler.timesteps]


def schedule(scheduler: Any, steps: int, latent_spatial: tuple[int, int, int]) -> list[tuple[Any, Any]]:
    if isinstance(scheduler, RFlowScheduler):
        return rflow_timesteps(scheduler, steps, latent_spatial)
    return ddpm_timesteps(scheduler, steps)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _CachedEmbedding(torch.nn.Module):
    """Stands in for the ControlNet's condition embedding and returns what it computed once."""

    def __init__(self, embedded: torch.Tensor):
        super().__init__()
        self.embedded = embedded

    def forward(self, _condition: torch.Tensor) -> torch.Tensor:
        return self.embedded


@contextlib.contextmanager
def condition_embedded_once(controlnet: torch.nn.Module, controlnet_cond: torch.Tensor):
    """The ControlNet's condition embedding (convolutions over the full-resolution mask) does not depend on the
    timestep: compute it once per sample, not once per step — identical output, about a third less time per step
    at 128³ on a CPU. The module is restored afterwards."""
    original = getattr(controlnet, "controlnet_cond_embedding", None)
    if original is None:  # not a MONAI ControlNet (an exported or stand-in network): nothing to cache
        yield
        return
    controlnet.controlnet_cond_embedding = _CachedEmbedding(original(controlnet_cond))
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = original


UNCONDITIONAL_CLASS = 0  # the modality class "unknown" that NV-Generate-CTMR trains with for CFG (p 0.1 dropout)


def guided_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs of a classifier-free-guidance step, batch 2: [conditional, unconditional]. Every input is
    repeated; the class labels (when the network takes them) of the second half are the unconditional class 0."""
    doubled = {}
    for key, value in inputs.items():
        if key == "class_labels":
            doubled[key] = torch.cat([value, torch.full_like(value, UNCONDITIONAL_CLASS)])
        else:
            doubled[key] = torch.cat([value, value])
    return doubled


def guided_output(output: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale·(cond − uncond) of a batch-2 UNet output [cond, uncond] (NV-Generate-CTMR
    `diff_model_infer.py`, `utils_infer.run_controlnet_conditioned_image_dm`)."""
    cond, uncond = output.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


@dataclass
class Denoiser:
    """The model output for latents at a timestep: the ControlNet's residuals fed to the UNet, or, for an image-only
    model (`controlnet=None`), the UNet alone.

    With `guidance_scale` above 0 (None or 0: off), classifier-free guidance as NV-Generate-CTMR runs it, batch 2
    [conditional, unconditional] (`guided_inputs`, `guided_output`):
    - image-only: the unconditional half has the modality class 0;
    - with a ControlNet (tumour-presence guidance): the unconditional half is conditioned on `controlnet_uncond`
      (the mask with its tumours removed) with the modality class 0, in both networks; the UNet takes the batch-2
      ControlNet's residuals.

    `unet_inputs` carries spacing_tensor / class_labels / region tensors; `controlnet_inputs` class_labels."""

    unet: torch.nn.Module
    controlnet: torch.nn.Module | None = None
    controlnet_cond: torch.Tensor | None = None
    unet_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    controlnet_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    guidance_scale: float | None = None
    embed_condition_once: bool = True
    controlnet_uncond: torch.Tensor | None = None  # the unconditional ControlNet condition of a guided step

    def __post_init__(self) -> None:
        if not self.guided:
            return
        if self.controlnet is None and "class_labels" not in self.unet_inputs:
            raise ValueError("classifier-free guidance of an image-only model needs its modality class input")
        if self.controlnet is not None:
            if self.controlnet_uncond is None:
                raise ValueError("guidance with a ControlNet needs the unconditional condition (controlnet_uncond)")
            self.controlnet_cond = torch.cat([self.controlnet_cond, self.controlnet_uncond])
            self.controlnet_uncond = None  # held once, in the batch-2 condition
            self.controlnet_inputs = guided_inputs(self.controlnet_inputs)
        self.unet_inputs = guided_inputs(self.unet_inputs)

    @property
    def guided(self) -> bool:
        """On for any scale above 0, as upstream (`cfg_guidance_scale > 0`); 0 or None: off."""
        return self.guidance_scale is not None and self.guidance_scale > 0

    def ready(self) -> contextlib.AbstractContextManager:
        """While sampling: the ControlNet's condition embedded once (`condition_embedded_once`)."""
        if self.embed_condition_once and self.controlnet is not None:
            return condition_embedded_once(self.controlnet, self.controlnet_cond)
        return contextlib.nullcontext()

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guided:
            latents, t = torch.cat([latents, latents]), t.repeat(2)
        if self.controlnet is None:
            output = self.unet(x=latents, timesteps=t, **self.unet_inputs)
        else:
            down_residuals, mid_residual = self.controlnet(
                x=latents, timesteps=t, controlnet_cond=self.controlnet_cond, **self.controlnet_inputs)
            output = self.unet(x=latents, timesteps=t, down_block_additional_residuals=down_residuals,
                               mid_block_additional_residual=mid_residual, **self.unet_inputs)
        return guided_output(output, float(self.guidance_scale)) if self.guided else output


def sample(denoiser: Denoiser, scheduler: Any, latents: torch.Tensor, timesteps: list[tuple[Any, Any]],
           precision: str = "fp32", on_step: Callable[[int, int], None] | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """From `latents` (noise) to clean latents along `timesteps` (from `schedule`): RFlow steps use next_t, DDPM
    steps draw their noise from `generator`."""
    is_rflow = isinstance(scheduler, RFlowScheduler)
    device = latents.device
    with autocast_for(device, precision), denoiser.ready():
        for i, (t, next_t) in enumerate(timesteps):
            # The reference passes the fp16-rounded t as an fp32 tensor.
            model_output = denoiser(latents, torch.tensor([float(t)], dtype=torch.float32, device=device))
            if is_rflow:
                latents, _ = scheduler.step(model_output, t, latents, next_t)
            else:
                latents, _ = scheduler.step(model_output, t, latents, generator=generator)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
    return latents


def denoise(
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    scheduler: Any,
    latents: torch.Tensor,
    controlnet_cond: torch.Tensor | None,
    timesteps: list[tuple[Any, Any]],
    unet_inputs: dict[str, torch.Tensor],
    controlnet_inputs: dict[str, torch.Tensor],
    precision: str = "fp32",
    on_step: Callable[[int, int], None] | None = None,
    generator: torch.Generator | None = None,
    embed_condition_once: bool = True,
    guidance_scale: float | None = None,
    controlnet_uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sample` with a `Denoiser` made of these networks and inputs (the form the benchmarks call)."""
    denoiser = Denoiser(unet, controlnet, controlnet_cond, unet_inputs, controlnet_inputs, guidance_scale,
                        embed_condition_once, controlnet_uncond)
    return sample(denoiser, scheduler, latents, timesteps, precision, on_step, generator)
