"""VAE (autoencoder) training on CT images (reference-training-fid-trt.md §1).

Data: the "training" items of a datalist (paths relative to its folder), each a CT image (`class`/`modality` "mri"
selects the reference's MRI intensity chain). LoadImage → channel first → RAS → intensity (CT: −1000..1000 HU →
[0, 1], clipped; MRI: 0–99.5 percentiles → [0, 1], not clipped) → random augmentation (flips, 90° rotations,
intensity scale/shift, zoom, small rotations) → pad + random crop of `patch_size`. Validation volumes are whole
(padded to a multiple of 4) and reconstructed by sliding windows (`val_window`, clipped to the volume, overlap 0).

Folds: an item whose `fold` equals `val_fold` (default 0) is a VALIDATION item, every other item (or one without a
`fold`) trains. This is the reference's meaning (§4.2, `prepare_maisi_controlnet_json_dataloader`); the tutorials'
data README says the opposite ("fold 0 is used for training"), which is a documentation slip that NV PR #39 fixed — so
this is kept knowingly as "fold == val_fold → validation". `val_fold` None trains on every item, no validation.

Losses (§1.5): generator = L1 + kl_weight·KL + perceptual_weight·perceptual + adversarial_weight·adversarial, the
adversarial term on from the first epoch; KL = 0.5·Σ(μ² + σ² − log(σ² + 1e-10) − 1) per sample, batch mean;
perceptual = MONAI PerceptualLoss, 2.5D ("fake 3D", ratio 0.2, the three axes summed), in eval mode, on fp32
copies; discriminator = MONAI PatchDiscriminator (3 layers, 32 channels, instance norm) with
PatchAdversarialLoss(least squares), its loss ½·(fake-as-fake + real-as-real) on the detached reconstruction.
A weight of 0 skips its term entirely (no perceptual network is built; no discriminator is built or trained).
Optimisers (§1.6): two Adam (lr, eps 1e-6 with AMP else 1e-8), each with the reference's per-epoch warm-up
(LR ×0.01 for epochs < 10, ×0.1 for < 20, then ×1; `warmup` false turns it off), GradScalers with init scale 2**8 and
growth 1.5 under fp16 AMP.

Differences from the reference, on purpose:
- validation also runs after the last epoch (the reference only on `epoch % val_interval == 0`), so the final
  checkpoint always has a metric;
- the discriminator is run once on the concatenated fake+real batch (instance norm makes that exact) and, in the
  generator step, without DDP and with frozen parameters, so DDP sees one forward per backward;
- a real resume: `train_state.pt` holds both optimisers, scalers, warm-up schedules, the discriminator, the
  validation history and the RNG; the reference saves only plain state dicts every epoch;
- the random crops/augmentations are re-seeded from (seed, epoch, rank) each epoch, so a resumed run draws the same.

Outputs in `--out` (rank 0, after every epoch): `autoencoder.pt`, a bare state dict as the released
`models/autoencoder_v1.pt` (loadable with weights_only=True and by `maisi generate`); `autoencoder_best.pt` on a new
best validation loss; `train_state.pt` for `--resume`; `validation.json` (history and best).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from monai import transforms as mt
from monai.data import DataLoader
from monai.inferers import SlidingWindowInferer
from monai.losses import PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import PatchDiscriminator
from pydantic import field_validator

from maisi_cli.engine.decode import output_convolution_in_fp32
from maisi_cli.engine.networks import build_network, fuse_group_norms, set_tp_splits
from maisi_cli.engine.progress import ProgressCallback
from maisi_cli.engine.runtime import Runtime
from maisi_cli.engine.train.common import TrainConfig, TrainingError, all_reduce, autocast, make_scaler, wrap_ddp
from maisi_cli.engine.train.loop import (Optimisation, RunResult, Trainer, TrainingParts, TrainingRun,
                                         distributed_loader, run_training)
from maisi_cli.engine.weights import WeightFile, load_into, save_released_checkpoint
from maisi_cli.errors import UsageError
from maisi_cli.io.datalists import read_datalist
from maisi_cli.io.provenance import write_json

CHECKPOINT = "autoencoder.pt"
BEST = "autoencoder_best.pt"
STATE = "train_state.pt"
VALIDATION = "validation.json"
PERCEPTUAL_DEFAULT = "squeeze"  # the reference's LPIPS SqueezeNet
WEIGHTS_NETWORK = "resnet50"  # the only MONAI perceptual network that loads a local weights file


def parse_size(value: Any) -> list[int]:
    """64 → [64, 64, 64]; "64x64x32" / [64, 64, 32] → as given."""
    if isinstance(value, int):
        return [value] * 3
    if isinstance(value, str):
        parts = value.lower().split("x")
        if not all(p.strip().isdigit() for p in parts) or len(parts) not in (1, 3):
            raise ValueError(f"'{value}' is not a size; use N or XxYxZ, e.g. 64 or 96x96x64")
        sizes = [int(p) for p in parts]
        return sizes * 3 if len(sizes) == 1 else sizes
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError("must be N, XxYxZ or a list of three integers")


class VaeTrainConfig(TrainConfig):
    data: Path
    model: str = "rflow-ct"
    init: Path | None = None
    patch_size: list[int] = [64, 64, 64]
    kl_weight: float = 1e-7
    perceptual_weight: float = 0.3
    perceptual_network: str | None = None  # None: squeeze, or resnet50 with perceptual_weights
    perceptual_weights: Path | None = None
    fake_3d_ratio: float = 0.2
    adversarial_weight: float = 0.1
    discriminator_layers: int = 3
    val_every: int = 10
    val_fold: int | None = 0
    val_window: list[int] = [96, 96, 64]
    random_aug: bool = True
    warmup: bool = True
    # False: decode the latent mean, not a sample (a plain autoencoder). The reference always samples; with a small
    # latent and short training the sampling noise hides soft-tissue contrast (bench/demo/README.md).
    latent_sampling: bool = True
    # Not in the reference (L1, constant LR after the warm-up), both for short runs: "l2" weighs a voxel's error by
    # its size, so the few voxels far off (bone, organ contrast) drive the first epochs that L1's sign-only gradient
    # spends on the many voxels almost right; "cosine" takes the LR to 0 over the run (per step), so the last
    # weights are not a batch-1 snapshot that swings organ HU by tens of HU from one epoch to the next.
    recon_loss: Literal["l1", "l2"] = "l1"
    lr_decay: Literal["none", "cosine"] = "none"
    # Not in the reference: voxels whose target is at or above `bright_threshold` (the 0–1 training scale; CT:
    # (HU + 1000) / 2000, so 0.65 = 300 HU, cortical bone and contrast) weigh `bright_weight` times in the
    # reconstruction term. Thin bright structures are a few % of the voxels; a small VAE otherwise spends its
    # capacity on edges and texture and decodes 1–2-voxel bone at soft-tissue HU (bench/demo/README.md).
    bright_weight: float = 1.0
    bright_threshold: float = 0.65
    # The weight also covers the voxels within `bright_margin` voxels of a bright one. Weighing the bright voxels
    # alone makes overshoot beside them cheap, and the decoder then paints bone brightness into its neighbours
    # (the vertebra's interior, the liver next to the ribs): the session-7 pilot. With a margin the edge costs the
    # same on both sides.
    bright_margin: int = 0

    @field_validator("patch_size", "val_window", mode="before")
    @classmethod
    def _size(cls, value: Any) -> list[int]:
        sizes = parse_size(value)
        if any(s < 4 or s % 4 for s in sizes):
            raise ValueError(f"{value} must be multiples of 4 (the VAE downsamples by 4)")
        return sizes

    @field_validator("bright_weight")
    @classmethod
    def _at_least_one(cls, value: float) -> float:
        if not (value >= 1 and math.isfinite(value)):
            raise ValueError("must be a finite number ≥ 1 (1: every voxel weighs the same)")
        return value

    @field_validator("kl_weight", "perceptual_weight", "adversarial_weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError("must be a finite number ≥ 0")
        return value

    @field_validator("bright_margin")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be ≥ 0 (voxels around a bright voxel that share its weight)")
        return value

    @field_validator("val_every", "discriminator_layers")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be ≥ 1")
        return value


# --- data ---------------------------------------------------------------------------------------------------------
def split_folds(items: list[dict[str, Any]], val_fold: int | None) -> tuple[list[dict], list[dict]]:
    """(training, validation). `fold == val_fold` → validation (the reference's meaning, see the module doc)."""
    if val_fold is None:
        return list(items), []
    train = [item for item in items if item.get("fold") != val_fold]
    val = [item for item in items if item.get("fold") == val_fold]
    if not train:
        raise TrainingError(f"--data: every item is in fold {val_fold}, the validation fold, so nothing is left to "
                            f"train on; give items other folds or pick another val_fold")
    return train, val


def modality_of(item: dict[str, Any]) -> str:
    value = str(item.get("class", item.get("modality", "ct"))).lower()
    if value.startswith("mri"):
        return "mri"
    if value != "ct":
        raise TrainingError(f"--data: '{item['image']}' has class '{value}'; the VAE trainer knows ct and mri")
    return value


def vae_transform(config: VaeTrainConfig, modality: str, train: bool):
    """The reference's `VAE_Transform` chain (§1.2) for one modality, on the key "image"."""
    chain: list[Any] = [
        mt.LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
        mt.Orientationd(keys="image", axcodes="RAS", labels=None),
    ]
    if modality == "mri":
        chain += [mt.Lambdad(keys="image", func=lambda x: x[:1]),  # select_channel 0
                  mt.ScaleIntensityRangePercentilesd(keys="image", lower=0.0, upper=99.5, b_min=0.0, b_max=1.0,
                                                     clip=False)]
    else:
        chain.append(mt.ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True))
    if train:
        if config.random_aug:
            if modality == "mri":
                chain += [mt.RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.3)),
                          mt.RandGibbsNoised(keys="image", prob=0.3, alpha=(0.5, 1.0)),
                          mt.RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.5, 2.0)),
                          mt.RandHistogramShiftd(keys="image", prob=0.05, num_control_points=10)]
            chain += [mt.RandZoomd(keys="image", prob=0.3, min_zoom=0.5, max_zoom=1.5, keep_size=False,
                                   mode="trilinear"),
                      mt.RandRotated(keys="image", prob=0.3, range_x=0.1, range_y=0.1, range_z=0.1, keep_size=True,
                                     mode="bilinear")]
            chain += [mt.RandFlipd(keys="image", prob=0.5, spatial_axis=axis) for axis in (0, 1, 2)]
            chain += [mt.RandRotate90d(keys="image", prob=0.5, spatial_axes=axes) for axes in ((0, 1), (1, 2), (0, 2))]
            chain += [mt.RandScaleIntensityd(keys="image", prob=0.3, factors=(0.9, 1.1)),
                      mt.RandShiftIntensityd(keys="image", prob=0.3, offsets=0.05)]
        chain += [mt.SpatialPadd(keys="image", spatial_size=config.patch_size),
                  mt.RandSpatialCropd(keys="image", roi_size=config.patch_size, random_center=True,
                                      random_size=False)]
    else:
        chain.append(mt.DivisiblePadd(keys="image", k=4))
    chain.append(mt.EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return mt.Compose(chain)


class ImageDataset(torch.utils.data.Dataset):
    """Datalist items → {"image": (1, x, y, z) float32}, each through its modality's chain."""

    def __init__(self, items: list[dict[str, Any]], config: VaeTrainConfig, train: bool):
        self.items = [{"image": item["image"], "modality": modality_of(item)} for item in items]
        self.chains = {m: vae_transform(config, m, train) for m in {i["modality"] for i in self.items}}

    def __len__(self) -> int:
        return len(self.items)

    def reseed(self, seed: int) -> None:
        for chain in self.chains.values():
            chain.set_random_state(seed=seed % 2**32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        if not Path(item["image"]).is_file():
            raise TrainingError(f"--data: image '{item['image']}' does not exist")
        return {"image": self.chains[item["modality"]]({"image": item["image"]})["image"]}


# --- losses ---------------------------------------------------------------------------------------------------------
def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """Reference `KL_loss`: 0.5·Σ(μ² + σ² − log(σ² + 1e-10) − 1) over C and space, mean over the batch (σ, not log σ²)."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_sample = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-10) - 1,
                                 dim=list(range(1, z_mu.dim())))
    return per_sample.sum() / z_mu.shape[0]


def build_perceptual_loss(config: VaeTrainConfig, device: torch.device) -> torch.nn.Module | None:
    """MONAI PerceptualLoss (2.5D), or None when its weight is 0. Anything that stops it from being built here
    (no lpips/torchvision, no network for the download, a bad weights file) is one TrainingError line."""
    if config.perceptual_weight == 0:
        return None
    network = config.perceptual_network or (WEIGHTS_NETWORK if config.perceptual_weights else PERCEPTUAL_DEFAULT)
    if config.perceptual_weights is not None:
        if network != WEIGHTS_NETWORK:
            raise UsageError(f"--perceptual-weights: MONAI loads a local weights file only for "
                             f"--perceptual-network {WEIGHTS_NETWORK}, not '{network}'")
        if not config.perceptual_weights.is_file():
            raise UsageError(f"--perceptual-weights: '{config.perceptual_weights}' does not exist")
    try:
        loss = PerceptualLoss(spatial_dims=3, network_type=network, is_fake_3d=True,
                              fake_3d_ratio=config.fake_3d_ratio,
                              pretrained_path=str(config.perceptual_weights) if config.perceptual_weights else None)
    except Exception as error:  # noqa: BLE001 — optional imports, downloads and file loads all fail differently
        reason = str(error).strip().splitlines()[0][:140] if str(error).strip() else type(error).__name__
        how = ("pass --perceptual-weights FILE (a local ResNet-50 state dict; needs torchvision)"
               if config.perceptual_weights is None else
               "--perceptual-weights needs torchvision and a torchvision ResNet-50 state dict")
        raise TrainingError(f"--perceptual-weight: the perceptual network '{network}' cannot be built here "
                            f"({type(error).__name__}: {reason}); {how}, or use --perceptual-weight 0 to train "
                            f"without it") from None
    return loss.to(device).eval()


def build_discriminator(layers: int) -> torch.nn.Module:
    return PatchDiscriminator(spatial_dims=3, num_layers_d=layers, channels=32, in_channels=1, out_channels=1,
                              norm="INSTANCE")


def check_discriminator_fits(patch_size: list[int], layers: int) -> None:
    """A dry run on one zero patch: instance norm needs more than one voxel at the deepest normalised layer."""
    probe = build_discriminator(layers).train()
    try:
        with torch.no_grad():
            probe(torch.zeros(1, 1, *patch_size))
    except (ValueError, RuntimeError):
        raise UsageError(f"--patch-size: {'x'.join(map(str, patch_size))} is too small for a {layers}-layer "
                         f"discriminator; use a larger patch (≥ 32 for 3 layers), set discriminator_layers lower "
                         f"in --config, or --adversarial-weight 0") from None


def warmup_rule(epoch: int) -> float:
    """Reference `warmup_rule` (per epoch)."""
    return 0.01 if epoch < 10 else (0.1 if epoch < 20 else 1.0)


def lr_rule(config: VaeTrainConfig, steps_per_epoch: int) -> tuple[Callable[[int], float], bool]:
    """(LR multiplier, stepped per optimiser step?). The warm-up rule per epoch (or 1), times a cosine from 1 to 0
    over all steps of the run when `lr_decay` is "cosine" (then the schedule counts steps, not epochs)."""
    warm = warmup_rule if config.warmup else (lambda epoch: 1.0)
    if config.lr_decay == "none":
        return warm, False
    total = max(config.epochs * steps_per_epoch, 1)

    def rule(step: int) -> float:
        return warm(step // steps_per_epoch) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return rule, True


def adversarial_logits(discriminator: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return discriminator(images.contiguous())[-1]


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, config: VaeTrainConfig) -> torch.Tensor:
    """L1 or L2 per voxel, the voxels at or above `bright_threshold` (and those within `bright_margin` voxels of
    one) times `bright_weight`, averaged over all voxels (so with weight 1 it is the plain mean, and the other
    voxels' gradient does not shrink as the weight grows)."""
    images = images.float()
    difference = reconstruction.float() - images
    per_voxel = difference.square() if config.recon_loss == "l2" else difference.abs()
    if config.bright_weight != 1.0:
        per_voxel = per_voxel * torch.where(bright_region(images, config), config.bright_weight, 1.0)
    return per_voxel.mean()


def bright_region(images: torch.Tensor, config: VaeTrainConfig) -> torch.Tensor:
    """Voxels of the *target* at or above the threshold, dilated by `bright_margin` voxels (a cube)."""
    bright = images >= config.bright_threshold
    margin = config.bright_margin
    if margin == 0:
        return bright
    pool = torch.nn.functional.max_pool3d if images.ndim == 5 else torch.nn.functional.max_pool2d
    return pool(bright.float(), kernel_size=2 * margin + 1, stride=1, padding=margin) > 0


class VaeLosses:
    """The weighted loss terms of one batch; `generator_step` and `discriminator_step` are one optimiser step each."""

    def __init__(self, config: VaeTrainConfig, perceptual: torch.nn.Module | None,
                 discriminator: torch.nn.Module | None):
        self.config = config
        self.perceptual = perceptual
        self.discriminator = discriminator  # the plain module (for the generator term)
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def generator_terms(self, images: torch.Tensor, reconstruction: torch.Tensor, z_mu: torch.Tensor,
                        z_sigma: torch.Tensor, with_adversarial: bool = True) -> dict[str, torch.Tensor]:
        c = self.config
        terms = {"recon": reconstruction_loss(reconstruction, images, c), "kl": kl_loss(z_mu, z_sigma)}
        total = terms["recon"] + c.kl_weight * terms["kl"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction.float(), images.float())
            total = total + c.perceptual_weight * terms["perceptual"]
        if with_adversarial and self.discriminator is not None:
            for parameter in self.discriminator.parameters():
                parameter.requires_grad_(False)
            try:
                logits = adversarial_logits(self.discriminator, reconstruction)
            finally:
                for parameter in self.discriminator.parameters():
                    parameter.requires_grad_(True)
            terms["adversarial"] = self.adversarial(logits.float(), target_is_real=True, for_discriminator=False)
            total = total + c.adversarial_weight * terms["adversarial"]
        terms["total"] = total
        return terms

    def discriminator_loss(self, discriminator: torch.nn.Module, images: torch.Tensor,
                           reconstruction: torch.Tensor) -> torch.Tensor:
        """½·(fake-as-fake + real-as-real); one forward on [fake; real] (instance norm: same as two forwards)."""
        logits = adversarial_logits(discriminator, torch.cat([reconstruction.detach(), images]))
        fake, real = logits.float().split(images.shape[0])
        return 0.5 * (self.adversarial(fake, target_is_real=False, for_discriminator=True)
                      + self.adversarial(real, target_is_real=True, for_discriminator=True))


class MeanLatentAutoencoder(torch.nn.Module):
    """The autoencoder decoding its latent mean instead of a sample (`latent_sampling = false`); the same
    (reconstruction, z_mu, z_sigma) outputs, the same parameters (saved as the plain autoencoder's)."""

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.autoencoder.encode(images)
        return self.autoencoder.decode(z_mu), z_mu, z_sigma


def trained_forward(autoencoder: torch.nn.Module, config: VaeTrainConfig) -> torch.nn.Module:
    return autoencoder if config.latent_sampling else MeanLatentAutoencoder(autoencoder)


# --- validation ---------------------------------------------------------------------------------------------------
def reconstruct(autoencoder: torch.nn.Module, image: torch.Tensor, window: list[int]) -> tuple[torch.Tensor, ...]:
    """(reconstruction, z_mu, z_sigma) of a whole volume by sliding windows (reference `dynamic_infer`): the
    window is clipped to the volume per axis; a volume no larger than the window is one direct call."""
    spatial = list(image.shape[2:])
    roi = [min(w, s) for w, s in zip(window, spatial)]
    if roi == spatial:
        return autoencoder(image)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=0.0, mode="constant")
    return inferer(image, autoencoder)


@torch.no_grad()
def validate(autoencoder: torch.nn.Module, losses: VaeLosses, dataset: ImageDataset, indices: list[int],
             config: VaeTrainConfig, runtime: Runtime, amp: tuple[bool, torch.dtype]) -> dict[str, float]:
    """Mean over this rank's volumes (then over ranks) of recon, KL, perceptual and the weighted val loss (no
    adversarial term, as the reference), and 1/std(z_mu) of the last volume (should stay near 1). `autoencoder`
    is the plain network; it runs as trained (`trained_forward`)."""
    device = runtime.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # total, recon, kl, perceptual, volumes
    scale = torch.zeros(2, dtype=torch.float64, device=device)  # 1/std(z_mu), count
    autoencoder.eval()
    forward = trained_forward(autoencoder, config)
    for index in indices:
        image = dataset[index]["image"].unsqueeze(0).to(device)
        # The metric must not carry bf16's rounding of the output (7.8 HU steps; see output_convolution_in_fp32):
        # --amp on the CPU would otherwise report a validation error the generated images do not have.
        with autocast(device, *amp), output_convolution_in_fp32(autoencoder):
            reconstruction, z_mu, z_sigma = reconstruct(forward, image, config.val_window)
            terms = losses.generator_terms(image, reconstruction, z_mu, z_sigma, with_adversarial=False)
        l1 = torch.nn.functional.l1_loss(reconstruction.float(), image.float())  # the metric, whatever recon_loss
        sums += torch.tensor([terms["total"].item(), l1.item(), terms["kl"].item(),
                              float(terms["perceptual"].item()) if "perceptual" in terms else 0.0, 1.0],
                             dtype=torch.float64, device=device)
        scale = torch.tensor([1.0 / float(z_mu.float().std()), 1.0], dtype=torch.float64, device=device)
    autoencoder.train()
    all_reduce(sums, runtime)
    all_reduce(scale, runtime)
    count = max(float(sums[4]), 1.0)
    result = {"val_loss": float(sums[0]) / count, "val_recon_l1": float(sums[1]) / count,
              "val_kl": float(sums[2]) / count, "volumes": int(sums[4]),
              "scale_factor": float(scale[0] / scale[1]) if scale[1] > 0 else float("nan")}
    if losses.perceptual is not None:
        result["val_perceptual"] = float(sums[3]) / count
    return result


# --- the run ------------------------------------------------------------------------------------------------------
def train_vae(config: VaeTrainConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train (or resume / fine-tune) the autoencoder of `config.model`; returns a summary. Call under torchrun for
    DDP."""
    return run_training(VaeTrainer(config), on_progress)


class VaeTrainer(Trainer):
    """The autoencoder (the generator) and, with an adversarial weight, the patch discriminator, each with its Adam,
    warm-up schedule and GradScaler; validation every `val_every` epochs when there is a validation fold."""

    kind, component, checkpoint_name = "vae", "autoencoder", CHECKPOINT
    config: VaeTrainConfig

    def build(self, run: TrainingRun) -> TrainingParts:
        config, device = self.config, run.device
        self.run = run
        train_items, val_items = split_folds(read_datalist(config.data, empty_error=TrainingError), config.val_fold)
        self.train_set = ImageDataset(train_items, config, train=True)
        self.val_set = ImageDataset(val_items, config, train=False)
        self.validation_every = config.val_every if len(self.val_set) else None
        adversarial_on = config.adversarial_weight > 0
        if adversarial_on:
            check_discriminator_fits(config.patch_size, config.discriminator_layers)
        perceptual = build_perceptual_loss(config, device)  # fails early, before any work, when it cannot be built
        self.autoencoder = self.initial_autoencoder(run)
        self.discriminator = (build_discriminator(config.discriminator_layers).to(device).train() if adversarial_on
                              else None)
        # Built before the RNG is restored on --resume: MONAI's DataLoader draws a seed from torch's RNG.
        sampler, loader = distributed_loader(self.train_set, config, run.runtime, DataLoader)
        eps = 1e-6 if run.amp[0] else 1e-8
        rule, per_step = lr_rule(config, len(loader))
        self.generator = self.optimisation(self.autoencoder, eps, rule, per_step)
        self.critic = (self.optimisation(self.discriminator, eps, rule, per_step) if self.discriminator is not None
                       else None)
        self.losses = VaeLosses(config, perceptual, self.discriminator)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "val_loss": float("inf")}
        self.last_val: dict[str, Any] | None = None
        optimisations = [self.generator] + ([self.critic] if self.critic is not None else [])
        return TrainingParts(loader, sampler, optimisations, len(self.train_set))

    def initial_autoencoder(self, run: TrainingRun) -> torch.nn.Module:
        """The spec's autoencoder in training mode, with --resume's or --init's weights when given."""
        config = self.config
        # The precision decides norm_float16 (fp16 on CUDA only): bf16 autocast must not turn it on.
        enabled, dtype = run.amp
        precision = ("fp16" if dtype == torch.float16 else "bf16") if enabled else "fp32"
        autoencoder = build_network(run.spec, "autoencoder", run.device, precision=precision)
        set_tp_splits(autoencoder, 1)  # the reference trains with num_splits 1 (TP splitting is for inference)
        fuse_group_norms(autoencoder)  # MONAI's per-group loop saves memory on whole-body volumes, not on patches
        if config.resume or config.init is not None:
            source = run.checkpoint if config.resume else config.init
            if not source.is_file():
                raise TrainingError(f"--init: '{source}' does not exist; give an autoencoder checkpoint")
            load_into(autoencoder, WeightFile("autoencoder", source.name, source, "path"), run.spec)
        return autoencoder.to(run.device).train()

    def optimisation(self, network: torch.nn.Module, eps: float, rule: Callable[[int], float],
                     per_step: bool) -> Optimisation:
        """Adam with the warm-up (and cosine) rule and the reference's GradScaler (init scale 2**8, growth 1.5)."""
        optimizer = torch.optim.Adam(network.parameters(), lr=self.config.lr, eps=eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=rule)
        scaler = make_scaler(self.run.device, *self.run.amp, init_scale=2.0**8, growth_factor=1.5)
        return Optimisation(optimizer, schedule, scaler, per_step)

    def restore(self, state: dict[str, Any], path: Path) -> None:
        try:
            if self.critic is not None and state.get("discriminator") is not None:
                self.discriminator.load_state_dict(state["discriminator"])
                self.critic.load_state_dict(state, suffix="_d")
            self.history = list(state.get("validation", []))
            self.best = dict(state.get("best", self.best))
        except (KeyError, ValueError, RuntimeError) as error:
            raise TrainingError(f"--resume: '{path}' does not fit this run ({type(error).__name__}); start a "
                                f"new --out or drop --resume") from None
        self.last_val = self.history[-1] if self.history else None

    def wrap(self, runtime: Runtime) -> None:
        self.model_g = wrap_ddp(trained_forward(self.autoencoder, self.config), runtime)
        self.model_d = wrap_ddp(self.discriminator, runtime) if self.discriminator is not None else None
        self.val_indices = list(range(runtime.rank, len(self.val_set), runtime.world_size))

    def begin_epoch(self, epoch: int) -> None:
        self.train_set.reseed(self.config.seed * 100_003 + epoch * 1_009 + self.run.runtime.rank)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One generator step, then (with a discriminator) one discriminator step on the detached reconstruction."""
        images = batch["image"].to(self.run.device)
        self.generator.zero_grad()
        with self.run.autocast():
            reconstruction, z_mu, z_sigma = self.model_g(images)
            terms = self.losses.generator_terms(images, reconstruction, z_mu, z_sigma)
        self.generator.step(terms["total"])
        losses = {"loss": terms["total"].item(), f"recon_{self.config.recon_loss}": terms["recon"].item(),
                  "kl": terms["kl"].item()}
        if self.model_d is not None:
            self.critic.zero_grad()
            with self.run.autocast():
                loss_d = self.losses.discriminator_loss(self.model_d, images, reconstruction)
            self.critic.step(loss_d)
            losses.update(adversarial_loss=terms["adversarial"].item(), discriminator_loss=loss_d.item())
        return losses

    def validate(self, epoch: int) -> dict[str, Any]:
        self.last_val = {"epoch": epoch + 1, **validate(self.autoencoder, self.losses, self.val_set, self.val_indices,
                                                          self.config, self.run.runtime, self.run.amp)}
        self.history.append(self.last_val)
        return self.last_val

    def save(self, epoch: int, metrics: dict[str, float], validation: dict[str, Any] | None) -> None:
        """autoencoder.pt, autoencoder_best.pt on a new best validation loss, validation.json."""
        out = self.config.out
        save_released_checkpoint(self.autoencoder, "autoencoder", self.run.checkpoint)
        if validation is not None and validation["val_loss"] < self.best["val_loss"]:
            self.best = {"epoch": epoch, "val_loss": validation["val_loss"]}
            save_released_checkpoint(self.autoencoder, "autoencoder", out / BEST)
        if self.history:
            write_json(out / VALIDATION, {"history": self.history, "best": self.best})

    def state_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {"validation": self.history, "best": self.best, "discriminator": None}
        if self.critic is not None:
            extras.update(discriminator={k: v.detach().cpu() for k, v in self.discriminator.state_dict().items()},
                          **self.critic.state_dict(suffix="_d"))
        return extras

    def summary(self, result: RunResult) -> dict[str, Any]:
        config, out = self.config, self.config.out
        perceptual = config.perceptual_network or (WEIGHTS_NETWORK if config.perceptual_weights
                                                   else PERCEPTUAL_DEFAULT)
        return {
            "checkpoint": str(result.run.checkpoint),
            "train_state": str(result.run.state),
            "validation": str(out / VALIDATION) if self.history else None,
            "best_checkpoint": str(out / BEST) if self.best["epoch"] else None,
            "model": result.run.spec.name,
            "epochs": config.epochs,
            "start_epoch": result.start_epoch,
            **result.metrics,
            "val": self.last_val,
            "best_epoch": self.best["epoch"] or None,
            "samples": result.samples,
            "val_samples": len(self.val_set),
            "perceptual": perceptual if self.losses.perceptual is not None else None,
            "adversarial": self.discriminator is not None,
            "world_size": result.run.runtime.world_size,
            "device": str(result.run.device),
            "amp": result.run.amp[0],
        }
