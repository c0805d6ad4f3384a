"""engine/train/vae.py: losses, folds, discriminator, checkpoints, resume and validation on tiny phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.decode import output_convolution_in_fp32
from maisi_cli.engine.networks import build_network, set_tp_splits
from maisi_cli.engine.runtime import Runtime
from maisi_cli.engine.train.common import TrainingError
from maisi_cli.engine.train.vae import (
    ImageDataset,
    MeanLatentAutoencoder,
    VaeLosses,
    VaeTrainConfig,
    build_discriminator,
    build_perceptual_loss,
    kl_loss,
    lr_rule,
    reconstruction_loss,
    split_folds,
    train_vae,
    validate,
)
from maisi_cli.errors import UsageError
from maisi_cli.io.datalists import read_datalist
from maisi_cli.models import get_model
from tests.helpers import Killed, kill_after_first_epoch, tiny_spec_document


def write_phantoms(folder: Path, num: int = 2) -> Path:
    """`maisi data phantoms` at 32³, 4 mm: phantom k has fold k mod 5 (so phantom_0000 is the validation item)."""
    result = CliRunner().invoke(app, ["--quiet", "data", "phantoms", "--out", str(folder), "--num", str(num),
                                      "--size", "32x32x32", "--spacing", "4"])
    assert result.exit_code == 0, result.stderr
    return folder / "datalist.json"


@pytest.fixture
def phantoms(tmp_path: Path) -> Path:
    return write_phantoms(tmp_path / "ph")


def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-rflow.json"
    path.write_text(json.dumps(tiny_spec_document()))
    return path


def config(tmp_path: Path, data: Path, out: str = "out", **options) -> VaeTrainConfig:
    """Tiny and fast: 16³ patches, no perceptual network (none can be built offline), a 2-layer discriminator
    (3 layers need ≥ 32³ patches), no augmentation or warm-up unless asked."""
    values = dict(data=data, out=tmp_path / out, model=str(spec_file(tmp_path)), device="cpu", patch_size=16,
                  perceptual_weight=0.0, discriminator_layers=2, random_aug=False, warmup=False, lr=1e-3)
    values.update(options)
    return VaeTrainConfig(**values)


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --- losses ----------------------------------------------------------------------------------------------------------
def test_kl_loss_is_the_reference_formula_per_sample_mean_over_batch():
    mu = torch.tensor([[[0.5, -1.0]], [[0.0, 0.0]]]).reshape(2, 1, 2, 1, 1)
    sigma = torch.tensor([[[1.0, 2.0]], [[1.0, 1.0]]]).reshape(2, 1, 2, 1, 1)
    first = 0.5 * ((0.25 + 1 - 0 - 1) + (1 + 4 - torch.log(torch.tensor(4.0 + 1e-10)) - 1))
    assert kl_loss(mu, sigma).item() == pytest.approx(float(first) / 2, rel=1e-5)
    assert kl_loss(torch.zeros(1, 4, 2, 2, 2), torch.ones(1, 4, 2, 2, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_reconstruction_loss_goes_down_on_one_phantom_with_kl_in_the_total(tmp_path, phantoms):
    settings = config(tmp_path, phantoms, patch_size=16)
    dataset = ImageDataset(split_folds(read_datalist(phantoms), 0)[0], settings, train=True)
    dataset.reseed(0)
    images = dataset[0]["image"].unsqueeze(0)
    assert images.shape == (1, 1, 16, 16, 16) and 0.0 <= images.min() and images.max() <= 1.0
    torch.manual_seed(0)
    autoencoder = build_network(get_model(settings.model), "autoencoder")
    set_tp_splits(autoencoder, 1)
    autoencoder.train()
    losses = VaeLosses(settings, None, None)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-3)
    recon = []
    for _ in range(12):
        optimizer.zero_grad()
        reconstruction, z_mu, z_sigma = autoencoder(images)
        terms = losses.generator_terms(images, reconstruction, z_mu, z_sigma)
        assert terms["total"].item() == pytest.approx(terms["recon"].item() + 1e-7 * terms["kl"].item(), rel=1e-5)
        assert terms["kl"].item() > 0 and "adversarial" not in terms and "perceptual" not in terms
        terms["total"].backward()
        optimizer.step()
        recon.append(terms["recon"].item())
    assert recon[-1] < 0.7 * recon[0], recon


def test_l2_reconstruction_loss_is_the_mean_squared_error():
    images, reconstruction = torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 0.5)
    reconstruction[..., 0, 0, 0] = 1.0
    z = torch.zeros(1, 4, 1, 1, 1)
    for name, expected in (("l1", (7 * 0.5 + 1.0) / 8), ("l2", (7 * 0.25 + 1.0) / 8)):
        losses = VaeLosses(VaeTrainConfig(data=Path("d.json"), out=Path("o"), recon_loss=name), None, None)
        assert losses.generator_terms(images, reconstruction, z, torch.ones_like(z))["recon"].item() == \
            pytest.approx(expected)


def test_bright_weight_multiplies_the_error_of_bright_target_voxels_only():
    images = torch.zeros(1, 1, 2, 2, 2)
    images[..., 0, 0, 0] = 0.8  # one bone voxel (600 HU) among air (0 = −1000 HU)
    reconstruction = images.clone()
    reconstruction[..., 0, 0, 0] = 0.6  # bone decoded 400 HU too dark
    reconstruction[..., 1, 1, 1] = 0.1  # one air voxel decoded 200 HU off
    base = dict(data=Path("d.json"), out=Path("o"), recon_loss="l2")
    plain = reconstruction_loss(reconstruction, images, VaeTrainConfig(**base)).item()
    weighted = reconstruction_loss(reconstruction, images, VaeTrainConfig(**base, bright_weight=10)).item()
    assert plain == pytest.approx((0.2**2 + 0.1**2) / 8)
    assert weighted == pytest.approx((10 * 0.2**2 + 0.1**2) / 8)
    # The threshold reads the target, not the reconstruction: at 0.05 the air voxel decoded at 0.1 is not
    # up-weighted (its target is 0), the bone voxel still is.
    low = VaeTrainConfig(**base, bright_weight=10, bright_threshold=0.05)
    assert reconstruction_loss(reconstruction, images, low).item() == pytest.approx(weighted)
    above_bone = VaeTrainConfig(**base, bright_weight=10, bright_threshold=0.9)
    assert reconstruction_loss(reconstruction, images, above_bone).item() == pytest.approx(plain)



def test_bright_margin_extends_the_weight_to_the_bright_voxels_neighbours_only():
    images = torch.zeros(1, 1, 1, 1, 6)
    images[..., 0] = 0.8  # bone at x = 0; its neighbour at x = 1, a voxel two away at x = 2
    reconstruction = images.clone()
    reconstruction[..., 1] = 0.3  # bone brightness painted into the neighbour (air)
    reconstruction[..., 2] = 0.3  # and into the voxel beyond the margin
    base = dict(data=Path("d.json"), out=Path("o"), recon_loss="l2", bright_weight=10)
    bright_only = reconstruction_loss(reconstruction, images, VaeTrainConfig(**base)).item()
    margin = reconstruction_loss(reconstruction, images, VaeTrainConfig(**base, bright_margin=1)).item()
    assert bright_only == pytest.approx(2 * 0.3**2 / 6)  # overshoot beside bone is as cheap as anywhere
    assert margin == pytest.approx((10 * 0.3**2 + 0.3**2) / 6)  # x = 1 weighs 10×, x = 2 still 1×


@pytest.mark.parametrize("key, value, problem", [("bright_margin", -1, "≥ 0"), ("bright_weight", 0.5, "≥ 1")])
def test_cli_refuses_a_bad_bright_setting_naming_the_key(tmp_path, phantoms, key, value, problem):
    settings = tmp_path / "vae.toml"
    settings.write_text(f"{key} = {value}\n")
    result = CliRunner().invoke(app, ["train", "vae", "--data", str(phantoms), "--out", str(tmp_path / "o"),
                                      "--config", str(settings), "--device", "cpu"])
    assert result.exit_code == 2 and f"key '{key}'" in result.stderr and problem in result.stderr
    assert not (tmp_path / "o").exists()


def test_cosine_lr_decay_runs_per_step_from_one_to_zero_times_the_warm_up():
    base = dict(data=Path("d.json"), out=Path("o"), epochs=2)
    rule, per_step = lr_rule(VaeTrainConfig(**base, warmup=False, lr_decay="cosine"), steps_per_epoch=10)
    assert per_step and rule(0) == pytest.approx(1.0) and rule(10) == pytest.approx(0.5)
    assert rule(20) == pytest.approx(0.0, abs=1e-12) and rule(5) > rule(6)
    warm, per_step = lr_rule(VaeTrainConfig(**base, warmup=True, lr_decay="cosine"), steps_per_epoch=10)
    assert warm(10) == pytest.approx(0.01 * 0.5)  # the reference's warm-up still applies per epoch
    constant, per_step = lr_rule(VaeTrainConfig(**base, warmup=False), steps_per_epoch=10)
    assert not per_step and constant(0) == constant(1) == 1.0


def test_cosine_decay_reaches_zero_at_the_last_step_and_resumes_exactly(tmp_path, phantoms):
    options = dict(epochs=2, adversarial_weight=0.0, lr_decay="cosine", recon_loss="l2", val_window=[16, 16, 16])
    rates = []
    straight = train_vae(config(tmp_path, phantoms, out="straight", **options),
                         lambda event: rates.append(event.metrics["lr"]) if event.stage == "train" else None)
    steps = len(rates)
    assert steps == 2 and rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-3 * 0.5)


    with pytest.raises(Killed):
        train_vae(config(tmp_path, phantoms, out="split", **options), kill_after_first_epoch)
    resumed = train_vae(config(tmp_path, phantoms, out="split", resume=True, **options))
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-4)
    a, b = load(tmp_path / "straight" / "autoencoder.pt"), load(tmp_path / "split" / "autoencoder.pt")
    for key, value in a.items():
        assert torch.allclose(value, b[key], atol=1e-5), key
    assert load(tmp_path / "split" / "train_state.pt")["lr_schedule"]["last_epoch"] == 2  # counted in steps


class FakePerceptual(torch.nn.Module):
    def forward(self, x, y):
        return (x - y).abs().mean() * 0 + 2.0


def test_perceptual_and_adversarial_terms_enter_with_their_weights(tmp_path, phantoms):
    settings = config(tmp_path, phantoms, perceptual_weight=0.3, adversarial_weight=0.1)
    discriminator = build_discriminator(2).train()
    losses = VaeLosses(settings, FakePerceptual(), discriminator)
    images = torch.rand(1, 1, 16, 16, 16)
    reconstruction = torch.rand(1, 1, 16, 16, 16, requires_grad=True)
    terms = losses.generator_terms(images, reconstruction, torch.zeros(1, 4, 4, 4, 4), torch.ones(1, 4, 4, 4, 4))
    expected = terms["recon"] + 0.3 * 2.0 + 0.1 * terms["adversarial"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["total"].backward()
    # the generator's adversarial term does not train the discriminator
    assert all(p.grad is None for p in discriminator.parameters()) and reconstruction.grad is not None
    assert all(p.requires_grad for p in discriminator.parameters())


def test_perceptual_weight_without_a_buildable_network_is_one_clear_line(tmp_path, phantoms):
    with pytest.raises(TrainingError) as caught:
        build_perceptual_loss(config(tmp_path, phantoms, perceptual_weight=0.3), torch.device("cpu"))
    message = str(caught.value)
    assert "\n" not in message and "--perceptual-weights FILE" in message and "--perceptual-weight 0" in message
    assert build_perceptual_loss(config(tmp_path, phantoms, perceptual_weight=0.0), torch.device("cpu")) is None
    with pytest.raises(UsageError, match="resnet50"):
        build_perceptual_loss(config(tmp_path, phantoms, perceptual_weight=0.3, perceptual_network="squeeze",
                                     perceptual_weights=phantoms), torch.device("cpu"))


# --- folds -----------------------------------------------------------------------------------------------------------
def test_fold_equal_to_val_fold_validates_the_rest_trains():
    """The reference's meaning (fold == configured fold → validation). The tutorials' data README says the reverse
    ("fold 0 is used for training"); that comment is the slip NV PR #39 fixed, so it is not followed here."""
    items = [{"image": "a", "fold": 0}, {"image": "b", "fold": 1}, {"image": "c", "fold": 2}, {"image": "d"}]
    train, val = split_folds(items, 0)
    assert [i["image"] for i in val] == ["a"] and [i["image"] for i in train] == ["b", "c", "d"]
    train, val = split_folds(items, 2)
    assert [i["image"] for i in val] == ["c"]
    train, val = split_folds(items, None)
    assert len(train) == 4 and val == []
    with pytest.raises(TrainingError, match="validation fold"):
        split_folds([{"image": "a", "fold": 0}], 0)


def test_phantom_folds_split_the_run(tmp_path):
    data = write_phantoms(tmp_path / "ph", num=3)  # folds 0, 1, 2
    summary = train_vae(config(tmp_path, data, epochs=1, adversarial_weight=0.0))
    assert summary["samples"] == 2 and summary["val_samples"] == 1
    summary = train_vae(config(tmp_path, data, out="o2", epochs=1, adversarial_weight=0.0, val_fold=None))
    assert summary["samples"] == 3 and summary["val_samples"] == 0 and summary["val"] is None


# --- runs ------------------------------------------------------------------------------------------------------------
def test_checkpoint_is_a_bare_state_dict_loadable_weights_only(tmp_path, phantoms):
    settings = config(tmp_path, phantoms, epochs=1, adversarial_weight=0.0)
    summary = train_vae(settings)
    checkpoint = load(tmp_path / "out" / "autoencoder.pt")
    fresh = build_network(get_model(settings.model), "autoencoder").state_dict()
    assert set(checkpoint) == set(fresh) and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    assert any(not torch.equal(checkpoint[k], fresh[k]) for k in fresh)
    state = load(tmp_path / "out" / "train_state.pt")
    assert {"optimizer", "scaler", "lr_schedule", "epoch", "rng", "discriminator", "validation"} <= set(state)
    assert state["epoch"] == 1 and summary["checkpoint"].endswith("autoencoder.pt")


def test_discriminator_trains_only_with_a_positive_adversarial_weight(tmp_path, phantoms):
    on = train_vae(config(tmp_path, phantoms, out="on", epochs=1, adversarial_weight=0.1))
    state = load(tmp_path / "on" / "train_state.pt")
    assert on["adversarial"] and "discriminator_loss" in on
    assert state["discriminator"] and state["optimizer_d"]["state"]  # Adam has state only after a step
    fresh = build_discriminator(2).state_dict()
    assert set(state["discriminator"]) == set(fresh)
    off = train_vae(config(tmp_path, phantoms, out="off", epochs=1, adversarial_weight=0.0))
    state = load(tmp_path / "off" / "train_state.pt")
    assert not off["adversarial"] and "discriminator_loss" not in off and state["discriminator"] is None
    assert "optimizer_d" not in state


def test_small_patch_for_the_discriminator_is_a_usage_error(tmp_path, phantoms):
    with pytest.raises(UsageError, match="too small"):
        train_vae(config(tmp_path, phantoms, epochs=1, discriminator_layers=3, adversarial_weight=0.1))


def test_validation_metrics_are_written_on_first_every_n_and_last_epoch(tmp_path, phantoms):
    summary = train_vae(config(tmp_path, phantoms, epochs=3, val_every=2, adversarial_weight=0.0,
                               val_window=[16, 16, 16]))
    document = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert [entry["epoch"] for entry in document["history"]] == [1, 3]
    for entry in document["history"]:
        assert entry["volumes"] == 1 and entry["val_loss"] > 0 and entry["val_kl"] > 0
        assert entry["val_loss"] == pytest.approx(entry["val_recon_l1"] + 1e-7 * entry["val_kl"], rel=1e-5)
    assert document["best"]["epoch"] in (1, 3) and summary["val"]["epoch"] == 3
    assert (tmp_path / "out" / "autoencoder_best.pt").is_file()


def test_resume_continues_exactly_with_the_discriminator(tmp_path, phantoms):
    straight = train_vae(config(tmp_path, phantoms, out="straight", epochs=2, adversarial_weight=0.1))


    with pytest.raises(Killed):
        train_vae(config(tmp_path, phantoms, out="split", epochs=2, adversarial_weight=0.1), kill_after_first_epoch)
    assert load(tmp_path / "split" / "train_state.pt")["epoch"] == 1
    resumed = train_vae(config(tmp_path, phantoms, out="split", epochs=2, adversarial_weight=0.1, resume=True))
    assert resumed["start_epoch"] == 1 and resumed["loss"] == pytest.approx(straight["loss"], rel=1e-4)
    a, b = load(tmp_path / "straight" / "autoencoder.pt"), load(tmp_path / "split" / "autoencoder.pt")
    for key, value in a.items():
        assert torch.allclose(value, b[key], atol=1e-5), key
    sa, sb = load(tmp_path / "straight" / "train_state.pt"), load(tmp_path / "split" / "train_state.pt")
    for key, value in sa["discriminator"].items():
        assert torch.allclose(value, sb["discriminator"][key], atol=1e-5), key
    assert [e["epoch"] for e in sb["validation"]] == [1, 2]


def test_fresh_run_into_a_used_folder_and_resume_without_one_are_refused(tmp_path, phantoms):
    with pytest.raises(TrainingError, match="no autoencoder.pt"):
        train_vae(config(tmp_path, phantoms, epochs=1, resume=True))
    train_vae(config(tmp_path, phantoms, epochs=1, adversarial_weight=0.0))
    with pytest.raises(TrainingError, match="--resume"):
        train_vae(config(tmp_path, phantoms, epochs=1, adversarial_weight=0.0))


def test_init_starts_from_a_released_autoencoder(tmp_path, phantoms):
    train_vae(config(tmp_path, phantoms, out="first", epochs=1, adversarial_weight=0.0))
    start = load(tmp_path / "first" / "autoencoder.pt")
    train_vae(config(tmp_path, phantoms, out="second", epochs=1, adversarial_weight=0.0, lr=1e-7,
                     init=tmp_path / "first" / "autoencoder.pt"))
    tuned = load(tmp_path / "second" / "autoencoder.pt")
    assert all(torch.allclose(tuned[k], start[k], atol=1e-4) for k in start)


def test_augmented_patches_keep_the_patch_size(tmp_path, phantoms):
    settings = config(tmp_path, phantoms, random_aug=True, patch_size="16x16x8")
    dataset = ImageDataset([{"image": str(phantoms.parent / "phantom_0001_image.nii.gz")}], settings, train=True)
    for seed in range(4):
        dataset.reseed(seed)
        assert dataset[0]["image"].shape == (1, 16, 16, 8)


def test_torchrun_two_processes_on_cpu_write_what_one_process_writes(tmp_path):
    """2 gloo processes, one train phantom each (phantom_0000 validates): one summary, the same files and keys."""
    from tests.helpers import run_torchrun

    data = write_phantoms(tmp_path / "ph", num=3)
    settings = tmp_path / "vae.toml"
    settings.write_text("discriminator_layers = 2\nwarmup = false\nrandom_aug = false\n")
    done = run_torchrun(["--json", "train", "vae", "--data", data, "--out", tmp_path / "ddp", "--model",
                         spec_file(tmp_path), "--device", "cpu", "--epochs", "1", "--patch-size", "16",
                         "--perceptual-weight", "0", "--config", settings])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one document: only rank 0 prints
    assert summary["world_size"] == 2 and summary["samples"] == 2
    single = train_vae(config(tmp_path, data, out="one", epochs=1))
    assert single["world_size"] == 1
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in sorted(p.name for p in one.iterdir() if p.suffix == ".pt"):
        assert set(load(ddp / name)) == set(load(one / name)), name


def test_amp_on_cpu_trains_the_vae_in_bf16(tmp_path, phantoms):
    options = dict(epochs=1, adversarial_weight=0.1, val_window=[16, 16, 16])
    fp32 = train_vae(config(tmp_path, phantoms, out="fp32", **options))
    bf16 = train_vae(config(tmp_path, phantoms, out="bf16", amp=True, **options))
    assert bf16["amp"] is True and fp32["amp"] is False
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.1)
    assert set(load(tmp_path / "bf16" / "autoencoder.pt")) == set(load(tmp_path / "fp32" / "autoencoder.pt"))


def test_validation_under_bf16_amp_measures_the_fp32_output_not_its_bf16_rounding(tmp_path, phantoms):
    """bf16 rounds a [0, 1] image to 2^-8 steps (7.8 HU): the reported val L1 must be that of the decoder's fp32
    output, as `maisi generate` writes it, not of its rounded copy."""
    torch.manual_seed(0)
    cfg = config(tmp_path, phantoms, val_window=[32, 32, 32], latent_sampling=False)
    autoencoder = build_network(get_model(cfg.model), "autoencoder").eval()
    set_tp_splits(autoencoder, 1)  # as the trainer
    with torch.no_grad():
        for parameter in autoencoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    dataset = ImageDataset(read_datalist(phantoms)[:1], cfg, train=False)
    image = dataset[0]["image"].unsqueeze(0)
    amp = (True, torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), output_convolution_in_fp32(autoencoder):
        fp32_output = MeanLatentAutoencoder(autoencoder)(image)[0]  # the latent mean: no sampling noise
    assert fp32_output.dtype == torch.float32 and not torch.equal(fp32_output, fp32_output.bfloat16().float())
    metrics = validate(autoencoder, VaeLosses(cfg, None, None), dataset, [0], cfg,
                       Runtime(device=torch.device("cpu")), amp)
    expected = torch.nn.functional.l1_loss(fp32_output, image).item()
    assert metrics["val_recon_l1"] == pytest.approx(expected, rel=1e-6)
