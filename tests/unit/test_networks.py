"""Building MAISI networks from model specs: the allow-list, references, device overrides, reference parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maisi_cli.engine.networks import build_network, build_scheduler, device_overrides, resolve_definition
from maisi_cli.errors import UsageError
from maisi_cli.models import get_model

REFERENCE_CONFIGS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "maisi-tutorials" / "configs"
VAE = "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi"


@pytest.mark.parametrize("target", [
    "os.system",
    "builtins.eval",
    "monai.networks.nets.DiffusionModelUNet",  # the right class, but not by its allowed path
    "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi.__init__",
    None,
])
def test_resolve_definition_refuses_targets_outside_allow_list(target):
    """A spec cannot make maisi import or call arbitrary code: unknown `_target_`s are a usage error."""
    definition = {"command": "echo hacked"}
    if target is not None:
        definition["_target_"] = target
    with pytest.raises(UsageError) as raised:
        resolve_definition({}, definition)
    assert raised.value.exit_code == 2
    assert "_target_" in str(raised.value)


def test_resolve_definition_resolves_references():
    """`@key` values are replaced by the spec's top-level constants; other values pass through unchanged."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    cls, kwargs = resolve_definition(
        {"latent_channels": 4, "spatial_dims": 3},
        {"_target_": VAE, "latent_channels": "@latent_channels", "spatial_dims": "@spatial_dims",
         "num_channels": [8, 16], "norm_eps": 1e-6, "name": "plain string"},
    )
    assert cls is AutoencoderKlMaisi
    assert kwargs == {"latent_channels": 4, "spatial_dims": 3, "num_channels": [8, 16], "norm_eps": 1e-6,
                      "name": "plain string"}


def test_resolve_definition_unknown_reference():
    """A reference to a constant the spec lacks is a usage error naming the reference."""
    with pytest.raises(UsageError, match="@missing"):
        resolve_definition({"latent_channels": 4}, {"_target_": VAE, "latent_channels": "@missing"})


@pytest.mark.parametrize("device,precision,flash,norm16", [
    ("cpu", "fp32", False, False),
    ("cpu", "fp16", False, False),
    ("cpu", "bf16", False, False),
    ("cuda", "fp32", True, False),
    ("cuda", "bf16", True, False),
    ("cuda", "fp16", True, True),
])
def test_device_overrides(device, precision, flash, norm16):
    """Flash attention only on CUDA; the VAE's fp16 GroupNorm output only on CUDA in fp16."""
    kwargs = {"use_flash_attention": True, "norm_float16": True, "num_channels": [8]}
    adjusted = device_overrides(kwargs, torch.device(device), precision)
    assert adjusted == {"use_flash_attention": flash, "norm_float16": norm16, "num_channels": [8]}
    assert kwargs == {"use_flash_attention": True, "norm_float16": True, "num_channels": [8]}  # not mutated


def test_device_overrides_never_switch_features_on():
    """Settings the spec turns off stay off on a GPU, and absent keys are not added."""
    adjusted = device_overrides({"use_flash_attention": False, "norm_float16": False}, torch.device("cuda"), "fp16")
    assert adjusted == {"use_flash_attention": False, "norm_float16": False}
    assert device_overrides({"num_res_blocks": 2}, torch.device("cuda"), "fp16") == {"num_res_blocks": 2}


def test_build_network_applies_cpu_overrides(tiny_spec):
    """On the CPU the spec's flash attention and fp16 norm are switched off in the built modules, which are in eval
    mode and run in fp32."""
    unet = build_network(tiny_spec, "diffusion_unet")
    vae = build_network(tiny_spec, "autoencoder")
    assert not unet.training and not vae.training
    flash = [m.use_flash_attention for m in unet.modules() if hasattr(m, "use_flash_attention")]
    assert flash and not any(flash)
    norm16 = [m.norm_float16 for m in vae.modules() if hasattr(m, "norm_float16")]
    assert norm16 and not any(norm16)
    from maisi_cli.engine.networks import set_tp_splits

    set_tp_splits(vae, 1)
    with torch.no_grad():
        out = vae.decode_stage_2_outputs(torch.zeros(1, 4, 4, 4, 4))
    assert out.shape == (1, 1, 16, 16, 16) and out.dtype == torch.float32


def test_build_network_unknown_component(tiny_spec):
    """Asking for a network the spec does not define is a usage error, not a KeyError."""
    with pytest.raises(UsageError, match="mask_generation_autoencoder_def"):
        build_network(tiny_spec, "mask_generation_autoencoder")


def test_build_scheduler_rflow_and_ddpm():
    """The rflow-ct model samples with MONAI's RFlowScheduler (timestep transform on, continuous timesteps), the
    ddpm-ct model with its DDPMScheduler (scaled linear betas)."""
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    rflow = build_scheduler(get_model("rflow-ct"))
    assert isinstance(rflow, RFlowScheduler)
    assert rflow.use_timestep_transform and not rflow.use_discrete_timesteps
    assert rflow.num_train_timesteps == 1000
    ddpm = build_scheduler(get_model("ddpm-ct"))
    assert isinstance(ddpm, DDPMScheduler)
    assert ddpm.num_train_timesteps == 1000
    assert float(ddpm.betas[0]) == pytest.approx(0.0015, rel=1e-4)
    assert float(ddpm.betas[-1]) == pytest.approx(0.0195, rel=1e-4)


@pytest.mark.parametrize("model,config", [("rflow-ct", "config_maisi3d-rflow.json"),
                                          ("ddpm-ct", "config_maisi3d-ddpm.json")])
def test_builtin_network_blocks_equal_reference(model, config):
    """The built-in models' network definitions are the reference MAISI network configs, block for block, so the
    released weights load into them."""
    path = REFERENCE_CONFIGS / config
    if not path.is_file():
        pytest.skip(f"reference configs not found at {REFERENCE_CONFIGS}")
    reference = json.loads(path.read_text())
    network = get_model(model).network
    for key in ("autoencoder_def", "diffusion_unet_def", "controlnet_def", "mask_generation_autoencoder_def",
                "mask_generation_diffusion_def", "noise_scheduler", "mask_generation_noise_scheduler"):
        assert network[key] == reference[key], key
    for key in ("spatial_dims", "image_channels", "latent_channels", "include_body_region",
                "mask_generation_scale_factor", "mask_generation_latent_shape"):
        assert network[key] == reference[key], key


def _vae_with_random_weights():
    from tests.helpers import fill_random

    vae = build_network(get_model("demo"), "autoencoder")  # its GroupNorms have several channels per group
    fill_random(vae, 3, scale=0.2)
    return vae


@pytest.mark.parametrize("amp", [False, True])
def test_fused_group_norms_compute_what_monai_computes(amp):
    """The VAE trainer's fused GroupNorm gives MONAI's outputs and gradients (fp32 statistics, fp32 output under
    bf16 autocast as MONAI's), with the same state-dict keys, so a VAE trained with it loads and runs anywhere."""
    from maisi_cli.engine.networks import fuse_group_norms, set_tp_splits

    reference, fused = _vae_with_random_weights().train(), _vae_with_random_weights().train()
    for vae in (reference, fused):
        set_tp_splits(vae, 1)  # as the trainer runs it
    assert fuse_group_norms(fused) > 0
    assert fused.state_dict().keys() == reference.state_dict().keys()
    image = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    results = []
    for vae in (reference, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z_mu = vae.encode(image)[0]
            reconstruction = vae.decode(z_mu)
        reconstruction.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None])
        results.append((z_mu.detach().float(), reconstruction.detach().float(), grads))
    tolerance = 2e-2 if amp else 1e-4
    for ours, theirs in zip(results[1], results[0]):
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance * float(theirs.abs().max()))
    assert results[0][1].std() > 0  # not a network that outputs a constant


def test_fused_group_norm_under_norm_float16_returns_fp16_as_monai():
    """The released VAE sets norm_float16: the fused norm then returns fp16 as MONAI's, equal up to fp16 rounding
    (MONAI casts to fp16 before its affine, the fused norm after; runs on the CPU too)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    from maisi_cli.engine.networks import fuse_group_norms

    def norm() -> torch.nn.Module:
        module = MaisiGroupNorm3D(num_groups=4, num_channels=8, eps=1e-6, affine=True, norm_float16=True)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            module.weight.copy_(1 + 0.3 * torch.randn(8, generator=generator))
            module.bias.copy_(0.3 * torch.randn(8, generator=generator))
        return module

    reference, fused = norm(), norm()
    assert fuse_group_norms(fused) == 1
    x = 3 * torch.randn(1, 8, 6, 6, 6, generator=torch.Generator().manual_seed(2)) + 1
    with torch.no_grad():
        expected, got = reference(x), fused(x)
    assert expected.dtype == got.dtype == torch.float16
    spacing = 2.0 ** -10 * float(expected.abs().max())  # fp16's step at the largest value
    assert torch.allclose(got.float(), expected.float(), rtol=0, atol=2 * spacing)
    assert not torch.allclose(got.float(), x, atol=0.1)  # it normalised
