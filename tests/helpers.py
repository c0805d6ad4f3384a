"""Test helpers: tiny MAISI networks with random non-zero weights in the released layout, and label maps."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from maisi_cli.engine.progress import ProgressEvent
from maisi_cli.models import IMAGE_COMPONENTS, ModelSpec, get_model

# MONAI's MAISI classes at a small size (reference-shaped definitions, 4x VAE, 2-level UNet with attention).
TINY_NETWORK = {
    "spatial_dims": 3,
    "image_channels": 1,
    "latent_channels": 4,
    "include_body_region": False,
    "autoencoder_def": {
        "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@image_channels", "out_channels": "@image_channels",
        "latent_channels": "@latent_channels", "num_channels": [8, 16, 16], "num_res_blocks": [1, 1, 1],
        "norm_num_groups": 8, "norm_eps": 1e-06, "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "use_checkpointing": False,
        "use_convtranspose": False, "norm_float16": True, "num_splits": 4, "dim_split": 1,
    },
    "diffusion_unet_def": {
        "_target_": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "out_channels": "@latent_channels",
        "num_channels": [16, 32], "attention_levels": [False, True], "num_head_channels": [0, 16],
        "num_res_blocks": 1, "norm_num_groups": 8, "use_flash_attention": True,
        "include_top_region_index_input": "@include_body_region",
        "include_bottom_region_index_input": "@include_body_region",
        "include_spacing_input": True, "num_class_embeds": 128, "resblock_updown": True, "include_fc": True,
    },
    "controlnet_def": {
        "_target_": "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "num_channels": [16, 32],
        "attention_levels": [False, True], "num_head_channels": [0, 16], "num_res_blocks": 1,
        "norm_num_groups": 8, "use_flash_attention": True, "conditioning_embedding_in_channels": 8,
        "conditioning_embedding_num_channels": [8, 16, 16], "num_class_embeds": 128, "resblock_updown": True,
        "include_fc": True,
    },
    # The mask generator at a small size: 8 bit-plane channels in, 125 label channels out, a 32^3 mask.
    "mask_generation_latent_shape": [4, 8, 8, 8],
    "mask_generation_autoencoder_def": {
        "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": 8, "out_channels": 125, "latent_channels": "@latent_channels",
        "num_channels": [8, 16, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 8, "norm_eps": 1e-06,
        "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False, "use_flash_attention": False, "use_checkpointing": True,
        "use_convtranspose": True, "norm_float16": True, "num_splits": 8, "dim_split": 1,
    },
    "mask_generation_diffusion_def": {
        "_target_": "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet",
        "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "out_channels": "@latent_channels",
        "channels": [8, 16], "attention_levels": [False, True], "num_head_channels": [0, 8], "num_res_blocks": 1,
        "norm_num_groups": 8, "use_flash_attention": True, "with_conditioning": True, "upcast_attention": True,
        "cross_attention_dim": 10,
    },
}


MASK_GENERATOR_KEYS = ("mask_generation_latent_shape", "mask_generation_autoencoder_def",
                       "mask_generation_diffusion_def", "mask_generation_noise_scheduler")


def tiny_spec_document(scheduler: str = "rflow", mask_generator: bool = False) -> dict:
    """A tiny model spec: the three image networks; with `mask_generator`, also the two mask-generation networks
    and the data files of the released layout (anatomy-size table, candidate-mask database and archive)."""
    base = get_model("rflow-ct" if scheduler == "rflow" else "ddpm-ct")
    network = copy.deepcopy(TINY_NETWORK)
    network["noise_scheduler"] = copy.deepcopy(base.network["noise_scheduler"])
    network["mask_generation_noise_scheduler"] = copy.deepcopy(base.network["mask_generation_noise_scheduler"])
    if not mask_generator:
        for key in MASK_GENERATOR_KEYS:
            network.pop(key, None)
    if scheduler == "ddpm":
        network["include_body_region"] = True
        for key in ("diffusion_unet_def", "controlnet_def"):
            network[key].pop("num_class_embeds")
    return {
        "name": f"tiny-{scheduler}",
        "description": "tiny test model",
        "modality": "ct",
        "default_steps": 4,
        "hf_repo": "example/tiny-maisi",
        "weights": dict(base.weights) if mask_generator else {c: base.weights[c] for c in IMAGE_COMPONENTS},
        "datasets": {"anatomy_size_conditions": "datasets/all_anatomy_size_conditions.json",
                     "mask_database": "datasets/candidate_masks.json",
                     "mask_archive": "datasets/all_masks.zip"} if mask_generator else {},
        "default_size": [32, 32, 32],
        "recommended_spacing": [{"size": [32, 32, 32], "spacing": [2.0, 2.0, 2.0]}],
        "network": network,
    }


def fill_random(network, seed: int, scale: float = 0.05) -> None:
    """Small non-zero random weights everywhere (MONAI zero-initialises the UNet output and ControlNet
    convolutions, so a freshly built network would predict zeros)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + noise)
            else:
                parameter.copy_(noise)


def write_released_weights(spec: ModelSpec, weights_dir: Path, seed: int = 0, scale_factor: float = 0.8,
                           with_mask_generator: bool = False) -> None:
    """Random networks of `spec`, saved under their repository names in the released layouts: the three image
    networks, and the two mask-generation networks when asked."""
    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.weights import save_released_checkpoint

    components = [c for c in spec.weights
                  if c in IMAGE_COMPONENTS or (with_mask_generator and f"{c}_def" in spec.network)]
    for i, component in enumerate(components):
        network = build_network(spec, component)
        fill_random(network, seed + i)
        save_released_checkpoint(network, component, weights_dir / spec.weights[component],
                                 scale_factor=scale_factor if "diffusion" in component else None)


def write_tiny_model(folder: Path, scheduler: str = "rflow", mask_generator: bool = True) -> tuple[Path, Path]:
    """(spec path, weights folder) of a tiny model with random weights (the mask generator's too by default)."""
    from maisi_cli.models import get_model as load

    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f"tiny-{scheduler}.json"
    spec_path.write_text(json.dumps(tiny_spec_document(scheduler, mask_generator), indent=2))
    weights_dir = folder / "weights"
    write_released_weights(load(str(spec_path)), weights_dir, with_mask_generator=mask_generator)
    return spec_path, weights_dir


def phantom_labels(size: tuple[int, int, int]) -> np.ndarray:
    """A body ellipsoid (200) with a liver (1), a spleen (3) and two lung lobes (28, 29), background outside."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in size), indexing="ij")
    labels = np.zeros(size, dtype=np.uint8)
    labels[(x / 0.85) ** 2 + (y / 0.7) ** 2 < 1] = 200
    labels[((x + 0.35) / 0.3) ** 2 + ((y + 0.1) / 0.3) ** 2 + ((z + 0.3) / 0.4) ** 2 < 1] = 1
    labels[((x - 0.45) / 0.15) ** 2 + ((y + 0.2) / 0.15) ** 2 + ((z + 0.3) / 0.2) ** 2 < 1] = 3
    labels[((x + 0.35) / 0.3) ** 2 + (y / 0.4) ** 2 + ((z - 0.45) / 0.4) ** 2 < 1] = 28
    labels[((x - 0.35) / 0.3) ** 2 + (y / 0.4) ** 2 + ((z - 0.45) / 0.4) ** 2 < 1] = 29
    return labels


def write_mask(path: Path, size: tuple[int, int, int], spacing: tuple[float, float, float],
               dtype=np.uint8, labels: np.ndarray | None = None) -> Path:
    import nibabel as nib

    data = phantom_labels(size) if labels is None else labels
    nib.save(nib.Nifti1Image(data.astype(dtype), np.diag([*spacing, 1.0])), str(path))
    return path


def run_torchrun(args: list[str], timeout: int = 300):
    """`torchrun --standalone --nproc_per_node 2 -m maisi_cli ARGS` (gloo on the CPU, one thread per process), or a
    pytest skip when torchrun is not beside this Python."""
    import os
    import subprocess
    import sys

    import pytest

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"torchrun is not installed beside {sys.executable}")
    return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "maisi_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1],
                          stdin=subprocess.DEVNULL)


class Killed(Exception):
    """Raised by `kill_after_first_epoch`: a training run stopped as if its process died after epoch 1."""


def kill_after_first_epoch(event: ProgressEvent) -> None:
    """A trainer's progress callback that stops the run at its first epoch event (resume tests)."""
    if event.stage == "epoch":
        raise Killed


def full_disk_when_writing(monkeypatch, name: str) -> None:
    """Make the fsync of the temporary file of output `name` fail with ENOSPC, as a full disk does."""
    import errno
    import os

    import maisi_cli.io.files as files

    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if f".{name}." in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(files.os, "fsync", fsync)
