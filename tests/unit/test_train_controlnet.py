"""engine/train/controlnet.py: in-place residuals, weighted loss, frozen UNet, checkpoints, resume, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi_cli.engine.networks import build_network, build_scheduler
from maisi_cli.engine.sampling import label_bit_planes
from maisi_cli.engine.train.common import TrainingError
from maisi_cli.engine.train.controlnet import (
    ControlNetTrainConfig,
    controlnet_loss,
    loss_weights,
    train_controlnet,
    unet_with_residuals,
)
from maisi_cli.models import get_model
from tests.helpers import (
    Killed,
    fill_random,
    kill_after_first_epoch,
    phantom_labels,
    tiny_spec_document,
    write_mask,
    write_released_weights,
)
from tests.unit.test_train_diffusion import write_latents

RELEASED_KEYS = {"controlnet_state_dict", "epoch", "loss"}


def write_controlnet_data(folder: Path, count: int = 2) -> Path:
    """Latents (8^3, as `maisi data embed` writes) + 32^3 label maps, listed with "label" in embeddings.json."""
    path = write_latents(folder, count=count)
    document = json.loads(path.read_text())
    for k, item in enumerate(document["training"]):
        write_mask(folder / f"case{k}_label.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
        item["label"] = f"case{k}_label.nii.gz"
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(spec path, weights folder with the released tiny networks, controlnet datalist)."""
    spec_path = tmp_path / "tiny-rflow.json"
    spec_path.write_text(json.dumps(tiny_spec_document("rflow")))
    weights = tmp_path / "weights"
    write_released_weights(get_model(str(spec_path)), weights, scale_factor=0.8)
    return spec_path, weights, write_controlnet_data(tmp_path / "emb")


def train(tmp_path: Path, setup, out: str = "out", on_progress=None, **options):
    spec_path, weights, data = setup
    config = ControlNetTrainConfig(data=options.pop("data", data), out=tmp_path / out, model=str(spec_path),
                                   weights_dir=weights, device="cpu", **options)
    return train_controlnet(config, on_progress)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def networks(spec_path: Path, frozen: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    spec = get_model(str(spec_path))
    unet, controlnet = build_network(spec, "diffusion_unet"), build_network(spec, "controlnet")
    fill_random(unet, 0)
    fill_random(controlnet, 1)
    for parameter in unet.parameters():
        parameter.requires_grad_(not frozen)
    return unet, controlnet.train()


def inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(phantom_labels((32, 32, 32)).astype(np.int64))[None, None]
    return {"x": torch.randn((1, 4, 8, 8, 8), generator=generator), "t": torch.tensor([500.0]),
            "cond": label_bit_planes(labels), "labels": labels,
            "unet": {"spacing_tensor": torch.full((1, 3), 200.0), "class_labels": torch.ones(1, dtype=torch.long)},
            "cn": {"class_labels": torch.ones(1, dtype=torch.long)}}


# --- the in-place residual addition ----------------------------------------------------------------------------------
def test_monai_in_place_residuals_break_backward_and_ours_does_not(tmp_path):
    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(json.dumps(tiny_spec_document("rflow")))
    unet, controlnet = networks(spec_path, frozen=False)  # a UNet whose activations autograd saves
    data = inputs()
    down, mid = controlnet(x=data["x"], timesteps=data["t"], controlnet_cond=data["cond"], **data["cn"])
    output = unet(x=data["x"], timesteps=data["t"], down_block_additional_residuals=down,
                  mid_block_additional_residual=mid, **data["unet"])
    with pytest.raises(RuntimeError, match="inplace"):
        output.abs().mean().backward()  # the MONAI forward: the problem the trainer works around

    controlnet.zero_grad(set_to_none=True)
    down, mid = controlnet(x=data["x"], timesteps=data["t"], controlnet_cond=data["cond"], **data["cn"])
    ours = unet_with_residuals(unet, data["x"], data["t"], down, mid, **data["unet"])
    ours.abs().mean().backward()
    assert all(p.grad is not None for p in controlnet.parameters())
    assert controlnet.controlnet_mid_block.conv.weight.grad.abs().sum() > 0
    assert controlnet.controlnet_cond_embedding.conv_in.conv.weight.grad.abs().sum() > 0

    with torch.no_grad():  # the same numbers as MONAI's forward
        down, mid = controlnet(x=data["x"], timesteps=data["t"], controlnet_cond=data["cond"], **data["cn"])
        ours = unet_with_residuals(unet, data["x"], data["t"], down, mid, **data["unet"])
        down, mid = controlnet(x=data["x"], timesteps=data["t"], controlnet_cond=data["cond"], **data["cn"])
        theirs = unet(x=data["x"], timesteps=data["t"], down_block_additional_residuals=down,
                      mid_block_additional_residual=mid, **data["unet"])
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_gradients_reach_the_controlnet_and_not_the_frozen_unet(tmp_path):
    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(json.dumps(tiny_spec_document("rflow")))
    unet, controlnet = networks(spec_path, frozen=True)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    data = inputs()
    scheduler = build_scheduler(get_model(str(spec_path)))
    loss = controlnet_loss(controlnet, unet, scheduler, data["x"], torch.randn_like(data["x"]), data["t"],
                           data["cond"], data["unet"], data["cn"])
    loss.backward()
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in controlnet.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    cn_before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert any(not torch.equal(cn_before[k], v) for k, v in controlnet.state_dict().items())


# --- the weighted loss ------------------------------------------------------------------------------------------------
def test_loss_weights_downsample_the_label_nearest_to_the_latent_grid():
    labels = torch.zeros((1, 1, 8, 8, 8), dtype=torch.uint8)
    labels[:, :, :4] = 7
    labels[:, :, 4:, :2] = 9
    weights = loss_weights(labels, torch.Size((1, 4, 4, 4, 4)), [7], 100.0)
    expected = torch.ones((1, 4, 4, 4, 4))
    expected[:, :, :2] = 100.0  # label voxels 0..3 → latent voxels 0, 1 on every channel
    assert torch.equal(weights, expected)
    assert loss_weights(labels, torch.Size((1, 4, 4, 4, 4)), [], 100.0) is None
    both = loss_weights(labels, torch.Size((1, 4, 4, 4, 4)), [7, 9], 100.0)
    assert both[:, :, 2:, :1].eq(100).all() and both[:, :, 2:, 1:].eq(1).all()


def test_weighted_loss_matches_a_hand_computation(tmp_path):
    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(json.dumps(tiny_spec_document("rflow")))
    unet, controlnet = networks(spec_path, frozen=True)
    scheduler = build_scheduler(get_model(str(spec_path)))
    data = inputs()
    noise = torch.randn_like(data["x"], generator=None)
    labels = torch.zeros((1, 1, 32, 32, 32), dtype=torch.int64)
    labels[:, :, :, :, :16] = 129  # the first half along z
    cond = label_bit_planes(labels)
    with torch.no_grad():
        plain = controlnet_loss(controlnet, unet, scheduler, data["x"], noise, data["t"], cond, data["unet"],
                                data["cn"])
        weighted = controlnet_loss(controlnet, unet, scheduler, data["x"], noise, data["t"], cond, data["unet"],
                                   data["cn"], loss_weights(labels, data["x"].shape, [129], 100.0))
        # by hand, with MONAI's own forward
        noisy = scheduler.add_noise(original_samples=data["x"], noise=noise, timesteps=data["t"])
        down, mid = controlnet(x=noisy, timesteps=data["t"], controlnet_cond=cond, **data["cn"])
        output = unet(x=noisy, timesteps=data["t"], down_block_additional_residuals=down,
                      mid_block_additional_residual=mid, **data["unet"])
        error = (output - (data["x"] - noise)).abs()
    by_hand = (100.0 * error[..., :4].sum() + error[..., 4:].sum()) / error.numel()
    assert plain.item() == pytest.approx(error.mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert weighted.item() > 10 * plain.item()


# --- runs ------------------------------------------------------------------------------------------------------------
def test_run_writes_released_layout_trains_the_controlnet_and_leaves_the_unet(tmp_path, setup, monkeypatch):
    import maisi_cli.engine.train.controlnet as controlnet_module  # where the trainer looks build_network up

    built = {}
    original = controlnet_module.build_network

    def spy(spec, component, *args, **kwargs):
        built[component] = original(spec, component, *args, **kwargs)
        return built[component]

    monkeypatch.setattr(controlnet_module, "build_network", spy)
    spec_path, weights, _ = setup
    unet_file = weights / "models" / "diff_unet_3d_rflow-ct.pt"
    digest = hashlib.sha256(unet_file.read_bytes()).hexdigest()
    summary = train(tmp_path, setup, epochs=1, lr=1e-3, weighted_label=[1], weighted_loss=100.0)
    assert np.isfinite(summary["loss"]) and summary["scale_factor"] == pytest.approx(0.8)
    assert summary["samples"] == 2 and summary["weighted_labels"] == [1]

    checkpoint = load(tmp_path / "out" / "controlnet.pt")  # weights_only=True works
    assert set(checkpoint) == RELEASED_KEYS and checkpoint["epoch"] == 1 and np.isfinite(checkpoint["loss"])
    state = load(tmp_path / "out" / "train_state.pt")
    assert {"optimizer", "scaler", "lr_schedule", "epoch", "rng"} <= set(state) and state["epoch"] == 1

    # the UNet: frozen, untouched in memory and on disk
    unet = built["diffusion_unet"]
    assert not any(p.requires_grad for p in unet.parameters()) and not unet.training
    released_unet = load(unet_file)["unet_state_dict"]
    assert all(torch.equal(released_unet[k], v.cpu()) for k, v in unet.state_dict().items())
    assert hashlib.sha256(unet_file.read_bytes()).hexdigest() == digest

    # the ControlNet: initialised from the UNet (shared names), then trained
    trained = checkpoint["controlnet_state_dict"]
    fresh = original(get_model(str(spec_path)), "controlnet").state_dict()
    assert set(trained) == set(fresh)
    shared = [k for k in trained if k in released_unet and released_unet[k].shape == trained[k].shape]
    assert len(shared) > 20
    assert any(not torch.equal(trained[k], released_unet[k]) for k in shared)
    # MONAI zero-initialises the ControlNet's output convs; training moves them
    assert fresh["controlnet_mid_block.conv.weight"].abs().sum() == 0
    assert trained["controlnet_mid_block.conv.weight"].abs().sum() > 0


def test_resume_continues_exactly(tmp_path, setup):
    train(tmp_path, setup, out="straight", epochs=2, lr=1e-3)


    with pytest.raises(Killed):
        train(tmp_path, setup, out="split", on_progress=kill_after_first_epoch, epochs=2, lr=1e-3)
    assert load(tmp_path / "split" / "controlnet.pt")["epoch"] == 1
    summary = train(tmp_path, setup, out="split", epochs=2, lr=1e-3, resume=True)
    assert summary["start_epoch"] == 1
    a, b = load(tmp_path / "straight" / "controlnet.pt"), load(tmp_path / "split" / "controlnet.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for key, value in a["controlnet_state_dict"].items():
        assert torch.allclose(value, b["controlnet_state_dict"][key], atol=1e-6), key
    assert load(tmp_path / "split" / "train_state.pt")["lr_schedule"]["last_epoch"] == 4


def test_init_starts_from_a_controlnet_checkpoint(tmp_path, setup):
    _, weights, _ = setup
    init = weights / "models" / "controlnet_3d_rflow-ct.pt"
    summary = train(tmp_path, setup, epochs=1, lr=1e-6, init=init)
    assert summary["initialised_from"] == str(init)
    start = load(init)["controlnet_state_dict"]["controlnet_mid_block.conv.weight"]
    trained = load(tmp_path / "out" / "controlnet.pt")["controlnet_state_dict"]["controlnet_mid_block.conv.weight"]
    assert start.abs().sum() > 0 and torch.allclose(trained, start, atol=1e-3)


# --- bad input ------------------------------------------------------------------------------------------------------
def test_missing_label_file_names_it(tmp_path, setup):
    _, _, data = setup
    (data.parent / "case1_label.nii.gz").unlink()
    with pytest.raises(TrainingError, match="case1_label.nii.gz.*does not exist"):
        train(tmp_path, setup, epochs=1)


def test_item_without_label_says_what_to_do(tmp_path, setup):
    _, _, data = setup
    document = json.loads(data.read_text())
    del document["training"][0]["label"]
    data.write_text(json.dumps(document))
    with pytest.raises(TrainingError, match="no \"label\" path"):
        train(tmp_path, setup, epochs=1)


def test_empty_datalist_is_a_clear_error(tmp_path, setup):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"training": []}))
    with pytest.raises(TrainingError, match="empty training split"):
        train(tmp_path, setup, data=empty, epochs=1)


def test_label_values_over_255_are_refused(tmp_path, setup):
    _, _, data = setup
    write_mask(data.parent / "case0_label.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), dtype=np.int16,
               labels=np.full((32, 32, 32), 300, dtype=np.int16))
    with pytest.raises(TrainingError, match="0..255"):
        train(tmp_path, setup, epochs=1)


def test_loss_falls_on_a_fixed_batch_over_a_short_run(tmp_path):
    """60 AdamW steps (lr 1e-2, seed 0) of a ControlNet (initialised from its frozen random UNet, as the trainer
    does) on one fixed (latent, noise, t, phantom label): the mean loss of the last 5 steps is under 0.99× that of
    the first 5. The ControlNet acts through zero-initialised output convolutions, so it starts slowly: measured
    0.982 after 30 steps and 0.972 after 60 (deterministic on the CPU); ~6 s."""
    from monai.networks.utils import copy_model_state

    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(json.dumps(tiny_spec_document("rflow")))
    spec = get_model(str(spec_path))
    unet = build_network(spec, "diffusion_unet")
    fill_random(unet, 0)
    unet.eval()
    for parameter in unet.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(0)
    controlnet = build_network(spec, "controlnet")
    copy_model_state(controlnet, unet.state_dict())
    controlnet.train()
    data = inputs(seed=0)
    noise = torch.randn(data["x"].shape, generator=torch.Generator().manual_seed(1))
    scheduler = build_scheduler(spec)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = controlnet_loss(controlnet, unet, scheduler, data["x"], noise, data["t"], data["cond"], data["unet"],
                               data["cn"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.99 * first, losses


def test_torchrun_two_processes_on_cpu_write_what_one_process_writes(tmp_path, setup):
    from tests.helpers import run_torchrun

    spec_path, weights, data = setup
    done = run_torchrun(["--json", "train", "controlnet", "--data", data, "--out", tmp_path / "ddp", "--model",
                         spec_path, "--weights-dir", weights, "--device", "cpu", "--epochs", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one document: only rank 0 prints
    assert summary["world_size"] == 2 and summary["samples"] == 2
    train(tmp_path, setup, out="one", epochs=2)
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir()) == [
        "controlnet.pt", "metrics.jsonl", "progress.png", "train_state.pt"]
    assert set(load(ddp / "controlnet.pt")) == set(load(one / "controlnet.pt")) == RELEASED_KEYS
    assert load(ddp / "controlnet.pt")["epoch"] == 2
    assert set(load(ddp / "train_state.pt")) == set(load(one / "train_state.pt"))
    # 2 labelled latents over 2 ranks: 1 step per epoch, 2 in all
    assert load(ddp / "train_state.pt")["lr_schedule"]["last_epoch"] == 2


def test_amp_on_cpu_trains_the_controlnet_in_bf16(tmp_path, setup):
    fp32 = train(tmp_path, setup, out="fp32", epochs=1)
    bf16 = train(tmp_path, setup, out="bf16", epochs=1, amp=True)
    assert bf16["amp"] is True and fp32["amp"] is False
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    assert set(load(tmp_path / "bf16" / "controlnet.pt")["controlnet_state_dict"]) == \
        set(load(tmp_path / "fp32" / "controlnet.pt")["controlnet_state_dict"])
