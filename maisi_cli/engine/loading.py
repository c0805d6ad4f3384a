"""The networks of a plan, loaded once: each weight file read once, hashed against the lock and loaded from the same
bytes, then swapped for the exported graphs of `--backend onnx|trt` where asked, then given the run's speed levers
(engine/levers.py; all off by default)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from maisi_cli.engine.backends import apply_backend, network_device
from maisi_cli.engine.decode import LatentDecoder
from maisi_cli.engine.levers import apply_levers, run_levers
from maisi_cli.engine.networks import LoadedModel, build_network, build_scheduler
from maisi_cli.engine.plan import GenerationPlan
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.weights import WeightFile, built_and_read, load_verified


def load_networks(plan: GenerationPlan, on_progress: ProgressCallback = no_progress) -> LoadedModel:
    """Load every weight file of the plan, one at a time, each from a single read whose bytes are hashed (against
    the lock) and loaded, so the sidecar's sha256 is that of the weights that ran; then hand the mask source what
    it needs."""
    backend = plan.request.backend
    device = torch.device(network_device(backend, plan.device))
    hashes, networks, scale_factors = {}, {}, {}
    for i, weight in enumerate(plan.weights):
        # before the read: the bar names the file being read and hashed (a released UNet takes seconds)
        on_progress(ProgressEvent("load", i, len(plan.weights), subject=weight.component))
        network, read = built_and_read(network_builder(plan, weight, device), weight)
        loaded_weights = load_verified(network, weight, plan.model, read)
        hashes[weight.component] = {"file": weight.repo_name, "path": str(weight.path),
                                    "sha256": loaded_weights.sha256}
        if "scale_factor" in loaded_weights.extras:
            scale_factors[weight.component] = loaded_weights.extras["scale_factor"]
        networks[weight.component] = network.to(device)
        on_progress(ProgressEvent("load", i + 1, len(plan.weights), subject=weight.component))
    decoder = LatentDecoder(networks["autoencoder"], scale_factors["diffusion_unet"]).to(device)
    swapped, record = apply_backend(backend, plan.model, networks, scale_factors, hashes, plan.device, plan.precision,
                                    plan.request.onnx_dir, on_progress)
    if "mask-unet" in swapped:
        networks["mask_generation_diffusion"] = swapped["mask-unet"]
    if "mask-decoder" in swapped:
        networks["mask_generation_decoder"] = swapped["mask-decoder"]
    levers, lever_record = run_levers(plan, backend)
    if lever_record is not None:  # no entry: every lever off, the reference path
        record["levers"] = lever_record
    unet, controlnet, decoder = apply_levers(
        levers, lever_record or {}, swapped.get("unet", networks["diffusion_unet"]),
        swapped.get("controlnet", networks.get("controlnet")), swapped.get("vae-decoder", decoder))
    loaded = LoadedModel(unet, controlnet, decoder, build_scheduler(plan.model), hashes, networks, scale_factors,
                         record)
    plan.mask_source.prepare(loaded)
    return loaded


def network_builder(plan: GenerationPlan, weight: WeightFile,
                    device: torch.device) -> Callable[[], torch.nn.Module]:
    """A builder of the weight's network, run beside the file's read (weights.built_and_read)."""
    return lambda: build_network(plan.model, weight.component, device, plan.precision)
