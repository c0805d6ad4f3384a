"""Latents → image in [0, 1]: the VAE decoder, whole or by Gaussian-blended sliding window (reference §7)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from monai.inferers import SlidingWindowInferer

from maisi_cli.engine.levers import cudnn_benchmark
from maisi_cli.engine.networks import set_tp_splits
from maisi_cli.engine.sampling import autocast_for
from maisi_cli.profiles import DecodePlan


class LatentDecoder(torch.nn.Module):
    """decode(z / scale_factor), as the reference `ReconModel`: latents live in the diffusion model's scaled space."""
    def __init__(self, autoencoder: torch.nn.Module, scale_factor: torch.Tensor):
        super().__init__()
        self.autoencoder = autoencoder
        self.register_buffer("scale_factor", torch.as_tensor(scale_factor, dtype=torch.float32).reshape(()))
        self.levers = None  # engine/levers.apply_levers: channels-last input, cuDNN benchmark while decoding

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.levers is not None and self.levers.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        return self.autoencoder.decode_stage_2_outputs(z / self.scale_factor.to(z.dtype))


@contextlib.contextmanager
def output_convolution_in_fp32(autoencoder: torch.nn.Module) -> Iterator[None]:
    """While active, the VAE decoder's last convolution (features → image) runs in fp32 even under autocast
    (nothing changes for an exported or compiled decoder, which has no such block).

    Under bf16 autocast that convolution returns bf16, whose 8 significant bits put the [0, 1] image on a grid of
    2^-8 near mid-range: 7.8 HU steps across the whole soft-tissue range once mapped to HU (the reference runs fp16 on
    GPUs, 2^-11 = 1 HU, so it never meets this). Its input is fp32 already (MONAI's GroupNorm returns fp32 under
    autocast; norm_float16 is on only in fp16, engine/networks.py), so this costs no memory, only one features → 1
    convolution in fp32.
    """
    blocks = getattr(getattr(autoencoder, "decoder", None), "blocks", None)
    if not blocks:
        yield
        return
    last = blocks[-1]
    bound_forward = last.forward

    def fp32_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return bound_forward(x.float())

    had_own_forward = "forward" in vars(last)
    last.forward = fp32_forward
    try:
        yield
    finally:
        if had_own_forward:
            last.forward = bound_forward
        else:
            del last.forward


def decode_latents(
    decoder: LatentDecoder,
    latents: torch.Tensor,
    plan: DecodePlan,
    on_window: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    clip: bool = True,
) -> torch.Tensor:
    """(1, C, x, y, z) latents → (1, K, 4x, 4y, 4z) decoder output on the CPU: the image clipped to [0, 1], or with
    `clip=False` the raw output (the mask VAE's 125 label logits).

    Sliding windows run on the latents' device and blend into a CPU buffer (Gaussian weights, sigma 0.125), as the
    reference does, so only one window's activations sit on the GPU at a time. In fp16/bf16 the decode runs under
    autocast, as the reference's (fp16 latents meet fp32 VAE weights); in bf16 its last convolution runs in fp32
    (`output_convolution_in_fp32`: bf16 output would step by 7.8 HU).
    """
    exact_output: contextlib.AbstractContextManager = contextlib.nullcontext()
    levers = getattr(decoder, "levers", None)
    if isinstance(decoder, LatentDecoder):  # not an exported decoder (--backend onnx), which decodes whole
        set_tp_splits(decoder.autoencoder, plan.tp_splits)
        if precision == "bf16":
            exact_output = output_convolution_in_fp32(decoder.autoencoder)
    with torch.inference_mode(), autocast_for(latents.device, precision), exact_output, \
            cudnn_benchmark(levers is not None and levers.cudnn_benchmark and latents.device.type == "cuda"):
        if plan.mode == "whole":
            image = decoder(latents)
            if on_window is not None:
                on_window(1, 1)
        else:
            calls = [0]

            def decode_window(window: torch.Tensor) -> torch.Tensor:
                output = decoder(window)
                calls[0] += 1
                if on_window is not None:
                    on_window(min(calls[0], plan.windows), plan.windows)
                return output

            inferer = SlidingWindowInferer(
                roi_size=plan.roi,
                sw_batch_size=1,
                overlap=plan.overlap,
                mode="gaussian",
                sw_device=latents.device,
                device=torch.device("cpu"),
            )
            image = inferer(latents, decode_window)
    return torch.clip(image, 0.0, 1.0).cpu() if clip else image.cpu()
