"""Tumour-presence guidance on the ControlNet path (issue 24, item 1), on the tiny MAISI networks with random non-zero
weights: batch 2 through ControlNet and UNet, [mask, mask without tumours] with the modality class [modality, 0], and
the step output uncond + S·(cond − uncond), as NV-Generate-CTMR `utils_infer.run_controlnet_conditioned_image_dm`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maisi_cli.engine.networks import build_network
from maisi_cli.engine.sampling import Denoiser, label_bit_planes, modality_condition, spacing_condition
from maisi_cli.models import ModelSpec
from tests.helpers import fill_random, phantom_labels, tiny_spec_document

SCALE = 2.5


@pytest.fixture(scope="module")
def networks():
    spec = ModelSpec.model_validate({**tiny_spec_document("rflow"), "source": "test"})
    unet = build_network(spec, "diffusion_unet").eval()
    controlnet = build_network(spec, "controlnet").eval()
    fill_random(unet, 1)
    fill_random(controlnet, 2)  # MONAI zero-initialises the zero convolutions: random weights make them count
    return spec, unet, controlnet


def planes(labels: np.ndarray) -> torch.Tensor:
    return label_bit_planes(torch.from_numpy(labels)[None, None])


def call(denoiser: Denoiser, latents: torch.Tensor, t: float) -> torch.Tensor:
    with torch.inference_mode(), denoiser.ready():
        return denoiser(latents, torch.tensor([t]))


@pytest.fixture(scope="module")
def inputs(networks):
    spec, _, _ = networks
    labels = phantom_labels((32, 32, 32))
    labels[8:12, 8:12, 8:12] = 26  # a hepatic tumour: the unconditional mask holds the liver (1) there instead
    uncond = labels.copy()
    uncond[uncond == 26] = 1
    latents = torch.randn((1, *spec.latent_shape((32, 32, 32))), generator=torch.Generator().manual_seed(3))
    return labels, uncond, latents


def test_the_guided_output_is_uncond_plus_scale_times_the_difference_of_two_separate_calls(networks, inputs):
    _, unet, controlnet = networks
    labels, uncond, latents = inputs
    spacing, modality = spacing_condition((2.0, 2.0, 2.0)), modality_condition(1)
    guided = Denoiser(unet, controlnet, planes(labels), {"spacing_tensor": spacing, "class_labels": modality},
                      {"class_labels": modality}, guidance_scale=SCALE, controlnet_uncond=planes(uncond))
    conditional = Denoiser(unet, controlnet, planes(labels), {"spacing_tensor": spacing, "class_labels": modality},
                           {"class_labels": modality})
    unconditional_class = modality_condition(0)
    unconditional = Denoiser(unet, controlnet, planes(uncond),
                             {"spacing_tensor": spacing, "class_labels": unconditional_class},
                             {"class_labels": unconditional_class})
    cond, uncond_out = call(conditional, latents, 700.0), call(unconditional, latents, 700.0)
    assert float((cond - uncond_out).abs().max()) > 1e-4  # the two branches differ: the test can tell them apart
    expected = uncond_out + SCALE * (cond - uncond_out)
    torch.testing.assert_close(call(guided, latents, 700.0), expected, rtol=1e-4, atol=1e-5)


def test_guidance_off_is_the_conditional_call_bit_for_bit(networks, inputs):
    _, unet, controlnet = networks
    labels, uncond, latents = inputs
    spacing, modality = spacing_condition((2.0, 2.0, 2.0)), modality_condition(1)
    plain = Denoiser(unet, controlnet, planes(labels), {"spacing_tensor": spacing, "class_labels": modality},
                     {"class_labels": modality})
    for off in (None, 0.0):
        again = Denoiser(unet, controlnet, planes(labels), {"spacing_tensor": spacing, "class_labels": modality},
                         {"class_labels": modality}, guidance_scale=off, controlnet_uncond=planes(uncond))
        assert torch.equal(call(again, latents, 500.0), call(plain, latents, 500.0))


def test_a_mask_without_tumours_differs_only_by_the_modality_class(networks, inputs):
    """No tumour: the unconditional mask is the mask itself, so the unconditional branch is the conditional one with
    the modality class 0 — guidance still runs (batch 2) and still changes the output through that class."""
    _, unet, controlnet = networks
    _, _, latents = inputs
    labels = phantom_labels((32, 32, 32))
    spacing, modality = spacing_condition((2.0, 2.0, 2.0)), modality_condition(1)
    guided = Denoiser(unet, controlnet, planes(labels), {"spacing_tensor": spacing, "class_labels": modality},
                      {"class_labels": modality}, guidance_scale=SCALE, controlnet_uncond=planes(labels))
    zero = modality_condition(0)
    unconditional = Denoiser(unet, controlnet, planes(labels), {"spacing_tensor": spacing, "class_labels": zero},
                             {"class_labels": zero})
    conditional = Denoiser(unet, controlnet, planes(labels), {"spacing_tensor": spacing, "class_labels": modality},
                           {"class_labels": modality})
    cond, uncond_out = call(conditional, latents, 300.0), call(unconditional, latents, 300.0)
    torch.testing.assert_close(call(guided, latents, 300.0), uncond_out + SCALE * (cond - uncond_out), rtol=1e-4,
                               atol=1e-5)


def test_generate_with_guidance_records_the_scale_and_the_unconditional_mask(tiny_model, tmp_path,
                                                                            monkeypatch):
    """Through the CLI: --guidance on a ControlNet model runs, and the sidecar records the scale and the voxels per
    label of the mask without its tumours; --guidance 0 writes the same image as no option."""
    import json

    import nibabel as nib
    from typer.testing import CliRunner

    from maisi_cli.cli.app import app
    from tests.helpers import write_mask

    labels = phantom_labels((32, 32, 32))
    labels[8:12, 8:12, 8:12] = 26
    mask = write_mask(tmp_path / "tumour.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), labels=labels)
    spec, weights = tiny_model

    from maisi_cli.engine import samples
    from maisi_cli.engine.masks.tumours import remove_tumours

    removals = []
    monkeypatch.setattr(samples, "remove_tumours", lambda array: removals.append(1) or remove_tumours(array))

    def generate(out, *extra):
        result = CliRunner().invoke(app, ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                          "--mask", str(mask), "--steps", "2", "--no-qc", "--out", str(out), *extra])
        assert result.exit_code == 0, result.stderr
        return json.loads((out / "sample_0000.json").read_text()), nib.load(out / "sample_0000_image.nii.gz")

    sidecar, guided = generate(tmp_path / "guided", "--guidance", "2")
    assert sidecar["guidance"] == 2.0
    assert len(removals) == 1  # the unconditional mask is made once, for the condition and the sidecar's counts
    tumour_free = np.where(labels == 26, 1, labels)  # the hepatic tumour becomes liver
    expected = {str(i): int((tumour_free == i).sum()) for i in np.unique(tumour_free) if i != 0}
    assert sidecar["guidance_unconditional_labels"] == expected
    off, plain = generate(tmp_path / "off", "--guidance", "0")[1], generate(tmp_path / "plain")[1]
    assert off.get_fdata().tobytes() == plain.get_fdata().tobytes()
    assert guided.get_fdata().tobytes() != plain.get_fdata().tobytes()  # guidance changed the image
