"""Image-only models (no ControlNet: MAISI v2's MR models): the spec facts, the UNet-only denoise loop with
classifier-free guidance on the modality class, MR output intensities, sample completeness and the usage errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi_cli.engine.plan import sample_tasks
from maisi_cli.engine.postprocess import intensity_to_mr, output_image
from maisi_cli.engine.run_folder import plan_generation, with_completion
from maisi_cli.engine.sampling import (UNCONDITIONAL_CLASS, denoise, guided_inputs, guided_output, modality_condition,
                                       schedule, spacing_condition)
from maisi_cli.errors import UsageError
from maisi_cli.models import ModelSpec
from maisi_cli.request import GenerateRequest
from tests.helpers import tiny_spec_document, write_mask


def image_only_document(**changes) -> dict:
    """The tiny rflow spec without a ControlNet (weights entry and definition), MR output, guidance 3."""
    document = tiny_spec_document("rflow")
    document["name"] = "tiny-mr"
    document["weights"].pop("controlnet")
    document["network"].pop("controlnet_def")
    document.update({"output_intensity": "mr", "cfg_guidance_scale": 3.0, **changes})
    return document


@pytest.fixture
def image_only_spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-mr.json"
    path.write_text(json.dumps(image_only_document()))
    return path


# --- the spec ---------------------------------------------------------------------------------------------------
def test_spec_without_controlnet_is_image_only():
    spec = ModelSpec.model_validate(image_only_document())
    assert spec.image_only and spec.image_components == ("autoencoder", "diffusion_unet")
    assert spec.guidance_scale == 3.0 and spec.output_intensity == "mr"
    # The plugin's layout: the network block keeps controlnet_def, but no ControlNet weights are named.
    with_definition = image_only_document()
    with_definition["network"]["controlnet_def"] = copy.deepcopy(tiny_spec_document()["network"]["controlnet_def"])
    assert ModelSpec.model_validate(with_definition).image_only
    ct = ModelSpec.model_validate(tiny_spec_document("rflow"))
    assert not ct.image_only and ct.guidance_scale is None and ct.output_intensity == "hu"
    assert "controlnet" in ct.image_components


def test_spec_naming_controlnet_weights_needs_its_definition():
    document = tiny_spec_document("rflow")
    document["network"].pop("controlnet_def")
    with pytest.raises(ValueError, match="controlnet_def"):
        ModelSpec.model_validate(document)


# Upstream's threshold (NV-Generate-CTMR diff_model_infer.py and utils_infer.py: `if cfg_guidance_scale > 0`):
# any scale above 0 turns guidance on, 1 and 0.5 included; 0 is off.
@pytest.mark.parametrize("scale, guided", [(None, None), (0, None), (0.5, 0.5), (1, 1), (15, 15)])
def test_spec_guidance_scale(scale, guided):
    assert ModelSpec.model_validate(image_only_document(cfg_guidance_scale=scale)).guidance_scale == guided


def test_spec_guidance_scale_below_zero_is_refused():
    with pytest.raises(ValueError, match="cfg_guidance_scale"):
        ModelSpec.model_validate(image_only_document(cfg_guidance_scale=-0.5))


# --- the denoise loop without a ControlNet ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def rflow_scheduler():
    from maisi_cli.engine.networks import build_scheduler
    from maisi_cli.models import get_model

    return build_scheduler(get_model("rflow-ct"))


class _RecordingUNet(torch.nn.Module):
    """Stands in for the diffusion UNet: predicts class_label + 1 in every voxel of each batch item (so the
    conditional and unconditional predictions differ), records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timesteps, **kwargs):
        self.calls.append({"x": x.clone(), "timesteps": timesteps.clone(), **kwargs})
        labels = kwargs.get("class_labels", torch.zeros(x.shape[0], dtype=torch.long))
        return (labels.float() + 1).view(-1, 1, 1, 1, 1).expand_as(x).clone()


class _RecordingScheduler:
    """A non-RFlow scheduler (the DDPM call path): records the model output, keeps the latents."""

    def __init__(self):
        self.outputs = []

    def step(self, model_output, t, latents, generator=None):
        self.outputs.append(model_output.clone())
        return latents, None


def test_denoise_without_controlnet_calls_the_unet_without_residuals(rflow_scheduler):
    pairs = schedule(rflow_scheduler, 5, (4, 4, 4))
    unet = _RecordingUNet()
    spacing, modality = spacing_condition((1.0, 1.0, 1.25)), modality_condition(9)
    out = denoise(unet, None, rflow_scheduler, torch.zeros(1, 4, 4, 4, 4), None, pairs,
                  {"spacing_tensor": spacing, "class_labels": modality}, {})
    assert out.shape == (1, 4, 4, 4, 4) and float(out.abs().max()) > 0
    assert len(unet.calls) == 5
    for call, (t, _) in zip(unet.calls, pairs):
        assert "down_block_additional_residuals" not in call and "mid_block_additional_residual" not in call
        assert call["x"].shape[0] == 1 and call["timesteps"].shape == (1,) and float(call["timesteps"][0]) == float(t)
        assert torch.equal(call["class_labels"], torch.tensor([9])) and torch.equal(call["spacing_tensor"], spacing)


@pytest.mark.parametrize("scale", [None, 0.0])
def test_guidance_off_runs_one_unet_batch(scale):
    unet, scheduler = _RecordingUNet(), _RecordingScheduler()
    denoise(unet, None, scheduler, torch.zeros(1, 4, 2, 2, 2), None, [(torch.tensor(500.0), None)],
            {"class_labels": modality_condition(9)}, {}, guidance_scale=scale)
    assert unet.calls[0]["x"].shape[0] == 1
    assert torch.all(scheduler.outputs[0] == 10.0)  # the conditional prediction (class 9 + 1)


def test_guidance_combines_conditional_and_unconditional_predictions():
    """CFG (NV-Generate-CTMR diff_model_infer): one UNet call on a batch of 2 — the latents, t and spacing
    repeated, class labels [modality, 0] — and the step takes uncond + s·(cond − uncond)."""
    unet, scheduler = _RecordingUNet(), _RecordingScheduler()
    latents = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    spacing = spacing_condition((1.0, 1.0, 1.25))
    denoise(unet, None, scheduler, latents, None, [(torch.tensor(700.0), None), (torch.tensor(300.0), None)],
            {"spacing_tensor": spacing, "class_labels": modality_condition(9)}, {}, guidance_scale=15.0)
    assert len(unet.calls) == 2
    call = unet.calls[0]
    assert torch.equal(call["x"], torch.cat([latents, latents]))
    assert torch.equal(call["timesteps"], torch.tensor([700.0, 700.0]))
    assert torch.equal(call["class_labels"], torch.tensor([9, UNCONDITIONAL_CLASS]))
    assert torch.equal(call["spacing_tensor"], torch.cat([spacing, spacing]))
    cond, uncond = 10.0, 1.0
    assert scheduler.outputs[0].shape == latents.shape
    assert torch.allclose(scheduler.outputs[0], torch.full_like(latents, uncond + 15.0 * (cond - uncond)))


def test_guided_output_formula():
    output = torch.stack([torch.full((4, 2), 3.0), torch.full((4, 2), 1.0)])  # [cond, uncond]
    assert torch.allclose(guided_output(output, 2.5), torch.full((1, 4, 2), 1.0 + 2.5 * (3.0 - 1.0)))


def test_a_scale_of_one_is_guidance_on_as_upstream():
    unet, scheduler = _RecordingUNet(), _RecordingScheduler()
    denoise(unet, None, scheduler, torch.zeros(1, 4, 2, 2, 2), None, [(torch.tensor(500.0), None)],
            {"class_labels": modality_condition(9)}, {}, guidance_scale=1.0)
    assert unet.calls[0]["x"].shape[0] == 2  # batch 2, as upstream runs it, though uncond + 1·(cond − uncond) = cond
    assert torch.all(scheduler.outputs[0] == 10.0)


def test_guidance_needs_class_labels_without_a_controlnet_and_the_uncond_mask_with_one():
    assert "class_labels" not in guided_inputs({"spacing_tensor": torch.ones(1, 3)})  # doubled as they are
    with pytest.raises(ValueError, match="modality class"):
        denoise(_RecordingUNet(), None, _RecordingScheduler(), torch.zeros(1, 4, 2, 2, 2), None, [],
                {"spacing_tensor": torch.ones(1, 3)}, {}, guidance_scale=2.0)
    with pytest.raises(ValueError, match="controlnet_uncond"):
        denoise(_RecordingUNet(), torch.nn.Identity(), _RecordingScheduler(), torch.zeros(1, 4, 2, 2, 2),
                torch.zeros(1, 8, 8, 8, 8), [], {"class_labels": modality_condition(9)}, {}, guidance_scale=2.0)


# --- output intensities -----------------------------------------------------------------------------------------
def test_mr_intensity_is_1000x_clipped_below_only():
    decoded = np.array([-0.2, 0.0, 0.25, 1.0, 1.3, 40.0], dtype=np.float32)
    np.testing.assert_allclose(intensity_to_mr(decoded), [0.0, 0.0, 250.0, 1000.0, 1300.0, 40000.0])
    written = output_image(decoded, "mr")
    assert written.dtype == np.int16
    np.testing.assert_array_equal(written, [0, 0, 250, 1000, 1300, 32767])
    # CT without a mask: HU, no body crop; with a mask: air outside the body.
    np.testing.assert_array_equal(output_image(decoded[:4], "hu"), [-1000, -1000, -500, 1000])
    np.testing.assert_array_equal(output_image(decoded[:4], "hu", np.array([0, 1, 0, 1])), [-1000, -1000, -1000, 1000])


# --- samples and the plan ----------------------------------------------------------------------------------------
def test_image_only_sample_is_complete_with_image_and_sidecar(tmp_path):
    request = GenerateRequest(out=tmp_path, num_samples=2)
    for name in ("sample_0000_image.nii.gz", "sample_0000.json"):
        (tmp_path / name).write_bytes(b"")
    image_only = with_completion(sample_tasks(request, image_only=True), overwrite=False)
    assert [t.complete for t in image_only] == [True, False]
    assert image_only[0].label is None and image_only[0].file_names == ["sample_0000_image.nii.gz",
                                                                       "sample_0000.json"]
    assert [t.complete for t in with_completion(sample_tasks(request), overwrite=False)] == [False, False]  # a pair also needs its label


@pytest.mark.parametrize("changes, option", [
    ({"mask": Path("mask.nii.gz")}, "--mask"),
    ({"anatomy": ("liver",)}, "--anatomy"),
    ({"anatomy": ("liver",), "anatomy_sizes": (("liver", 0.5),)}, "--anatomy"),
    ({"mask_database": Path("db.json")}, "--mask-database"),
    ({"label_mode": "requested"}, "--label-mode requested"),
    ({"body_regions": ("chest",)}, "--body-region"),
])
def test_mask_options_are_usage_errors(image_only_spec_path, tmp_path, changes, option):
    request = GenerateRequest(model=str(image_only_spec_path), device="cpu", out=tmp_path / "out", **changes)
    with pytest.raises(UsageError) as raised:
        plan_generation(request)
    assert str(raised.value) == f"model tiny-mr generates images only (no ControlNet): drop {option}"


def test_guidance_on_a_controlnet_model_is_tumour_presence_guidance(tiny_model, tmp_path):
    """--guidance on a ControlNet model plans tumour-presence guidance (NV-Generate-CTMR PR #24); 0 is off."""
    spec, weights = tiny_model
    request = GenerateRequest(model=str(spec), weights_dir=weights, device="cpu", out=tmp_path, guidance=3.0,
                              mask=write_mask(tmp_path / "m.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0)))
    assert plan_generation(request).guidance == 3.0
    assert plan_generation(request.model_copy(update={"guidance": 0.0})).guidance is None


def test_plan_of_an_image_only_model(image_only_spec_path, tmp_path):
    """No mask source, no ControlNet weights, QC off with its reason, the spec's guidance unless --guidance."""
    from maisi_cli.models import get_model
    from tests.helpers import write_released_weights

    weights = tmp_path / "weights"
    write_released_weights(get_model(str(image_only_spec_path)), weights)
    request = GenerateRequest(model=str(image_only_spec_path), device="cpu", out=tmp_path / "out",
                              weights_dir=weights)
    plan = plan_generation(request)
    described = plan.describe()
    assert described["mask"]["type"] == "none" and described["image_only"] is True
    assert set(described["weights"]) == {"autoencoder", "diffusion_unet"}
    assert described["guidance"] == 3.0 and described["output_intensity"] == "mr"
    assert described["qc"]["enabled"] is False and "image-only" in described["qc"]["note"]
    assert described["samples"][0]["files"] == ["sample_0000_image.nii.gz", "sample_0000.json"]
    assert plan_generation(request.model_copy(update={"guidance": 0.0})).guidance is None  # 0: off
    assert plan_generation(request.model_copy(update={"guidance": 1.0})).guidance == 1.0  # on above 0, as upstream
    assert plan_generation(request.model_copy(update={"guidance": 7.5})).guidance == 7.5
