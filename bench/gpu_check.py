"""One GPU check of every GPU path of maisi, sized for one device call of at most 8 minutes on a fresh lent H100.

Parts, in this order (each written to the JSON/MD as soon as it ends; a time-budget guard skips what would not end
before `--budget-s`, recorded as skipped with the reason, instead of the call being killed):

1. `environment`: device, memory, versions, cuDNN, flash attention available; CUDA start-up seconds.
2. `fp16_flash`: the released rflow-ct UNet with flash attention and the VAE decoder with `norm_float16`, as the
   engine builds them for fp16 (engine/networks.device_overrides): the flags each network ends up with, one forward
   in fp32 and under fp16 autocast, seconds and their relative difference.
3. `rflow_ct`, `ddpm_ct`: one generation each through the engine (`Generator.plan_run` + `run`, `maisi generate`'s
   path), 256x256x256 on the 80g profile, `--rflow-steps`/`--ddpm-steps` steps, phantom mask.
4. `mask_generation`: the mask-generation DDPM UNet for its 1000 steps at its native latent (64³ → 256³ mask) and
   the mask VAE decode, as engine/masks (sample_mask_latents, decode_latents).
5. `trainers`: `maisi train vae|diffusion|controlnet` (engine/train) for a few steps each with AMP (fp16 autocast
   and GradScaler on CUDA): seconds per step and peak memory; released architectures.
6. `fid`: `maisi fid` (the CLI, `--device cuda`) on random CT-like volumes with a random-weight RadImageNet ResNet-50.
7. `e2e_512`: the 512³ row end to end (load, denoise, decode, write: the sidecar's stage timings, peak memory per
   stage) on the 16g profile against the goal (≤ 20 s within 16 GiB peak allocated), plain torch and with
   `--e2e-levers` in the same call.
8. `levers`: plain torch, then each lever that needs no compilation (cudnn_benchmark, channels_last,
   decode_overlap 0.6666 and 0.25, decode_plan=planner; maisi_cli/levers.py, set through MAISI_LEVERS) on
   `--lever-row` (default 24g-512x512x128, `--lever-steps` 10): stage seconds, peaks, the image's |HU| difference
   to plain torch, and the speed-up per stage.
9. `table3`: the nine README Table 3 rows (bench/gpu_table3.py's rows and runner), plain torch, 30 steps, against the
   published A100 time and peak.
10. `levers_compile`: plain torch, then compile, cuda_graphs, and cudnn_benchmark+channels_last+cuda_graphs on the
   same row (compile seconds apart from the denoising: `timings_s.compile`, `denoise_without_compile`).

Planner refit (issue 25 item 4): every engine run records the measured peak allocated/reserved per stage beside
`maisi_cli/gpu_memory.py`'s prediction; OUT/gpu_check_refit_rows.json holds them in the form
`python bench/memory_fit.py --measured OUT/gpu_check_refit_rows.json` reads (peak_gib = the measured peak allocated).

Weights: random small non-zero weights in the released layouts (tests/helpers.write_released_weights; no download):
times and memory do not depend on the values; fp16 overflow of random weights is recorded, the numbers are kept.

On the device tool: the machine's image has torch, numpy, scipy, typer, rich, einops, pillow, matplotlib and
huggingface-hub but not MONAI, nibabel, pydantic or pynrrd; `bench/gpu_check_wheels.sh` downloads those as wheels
for its Python 3.12 into build/gpu-wheels (7.8 MB, ignored by git), which the call carries. The results come back
from $OUT; copy them into bench/results/. First call (about 8 minutes of the 15 a session has):

    run(carry=["build/gpu-wheels"], timeout_s=540, command="python3 -m pip install -q --no-index --no-deps
        --no-compile --no-cache-dir --target /tmp/site build/gpu-wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
        || exit; export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor; timeout 480 python3
        bench/gpu_check.py --out $OUT --budget-s 420 2>&1 | tee $OUT/gpu_check.log")

(as one line). While the machine is still warm (30 s), a second call measures what the first skipped (see the
JSON's `skipped` reasons), typically `--parts levers_compile,table3 --budget-s 240` with timeout_s=300 (each call
starts with an empty $OUT; the first call's files are already copied back by then: keep them before the second).

Locally:

    python bench/gpu_check.py [--parts a,b] [--budget-s 440] [--out bench/results]   → OUT/gpu_check.{json,md}
    python bench/gpu_check.py --tiny [--out DIR]   → every part on the CPU at tiny sizes (tiny spec, 32³, 2 steps,
                                                      fp32; compile with the "eager" backend) → gpu_check_tiny.*
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import gpu_table3  # noqa: E402  (bench/gpu_table3.py: the Table 3 rows, the engine runner and its stage meter)

from maisi_cli.levers import use_levers  # noqa: E402

GIB = 1024**3
PARTS = ("environment", "fp16_flash", "rflow_ct", "ddpm_ct", "mask_generation", "trainers", "fid", "e2e_512",
         "levers", "table3", "levers_compile")
# Seconds each part is expected to take on an H100 (from bench/results/gpu_table3.json on an H200, rounded up):
# the guard skips a part (or a run inside one) when less than this is left.
ESTIMATE_S = {"environment": 5, "fp16_flash": 20, "rflow_ct": 25, "ddpm_ct": 25, "mask_generation": 45,
              "trainers": 60, "fid": 40, "e2e_512": 45, "levers": 12, "table3": 15, "levers_compile": 12}
COMPILE_ESTIMATE_S = 150  # torch.compile of the UNet and ControlNet at one shape, cold cache (a guess to measure)
GOAL = {"end_to_end_s": 20.0, "peak_allocated_gib": 16.0}
LEVER_VARIANTS = (  # part "levers"; each part runs plain torch first, in the same call
    ("plain", "off"),
    ("cudnn_benchmark", "cudnn_benchmark"),
    ("channels_last", "channels_last"),
    ("decode_overlap=0.6666", "decode_overlap=0.6666"),  # the overlap upstream's 16g 256x256x256 file uses
    ("decode_overlap=0.25", "decode_overlap=0.25"),
    ("decode_plan=planner", "decode_plan=planner"),
)
COMPILE_VARIANTS = (  # part "levers_compile": minutes of compilation each, so after the rest
    ("plain", "off"),
    ("compile", "compile"),
    ("cuda_graphs", "cuda_graphs"),
    ("cudnn_benchmark+channels_last+cuda_graphs", "cudnn_benchmark,channels_last,cuda_graphs"),
)


class Budget:
    """Seconds left before `total_s` since the start; `allows(estimate)` is the guard."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.started = time.perf_counter()

    @property
    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.started)

    def allows(self, estimate_s: float) -> bool:
        return self.left >= estimate_s

    def reason(self, estimate_s: float) -> str:
        return (f"time budget: {max(self.left, 0):.0f} s of {self.total_s:.0f} s left, this needs about "
                f"{estimate_s:.0f} s (rerun with --parts to measure it)")


def cuda_peak(cuda: bool) -> dict[str, float] | None:
    import torch

    if not cuda:
        return None
    torch.cuda.synchronize()
    return {"allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}


def reset_peak(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(cuda: bool, function: Callable[[], Any]) -> tuple[Any, float]:
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = function()
    if cuda:
        torch.cuda.synchronize()
    return value, round(time.perf_counter() - start, 4)


class Check:
    """The run's settings, work folder, weights and results."""

    def __init__(self, options: argparse.Namespace):
        import torch

        self.options = options
        self.tiny = options.tiny
        self.cuda = torch.cuda.is_available() and not options.tiny
        self.device = "cuda" if self.cuda else "cpu"
        self.work = Path(tempfile.mkdtemp(prefix="maisi-gpu-check-"))
        os.environ.setdefault("MAISI_HOME", str(self.work / "home"))
        self.budget = Budget(options.budget_s)
        self.steps = options.steps or (2 if self.tiny else 30)  # the 512³ and Table 3 runs
        self.lever_steps = options.lever_steps or (2 if self.tiny else 10)
        self._models: dict[str, tuple[str, Path]] = {}

    # --- models with random weights -------------------------------------------------------------------------------
    def model(self, name: str) -> tuple[str, Path]:
        """(model argument, weights folder) of rflow-ct or ddpm-ct: the released layout with random weights (the
        mask generator's too for rflow-ct), or with --tiny the tiny test spec."""
        if name not in self._models:
            from maisi_cli.models import get_model
            from tests.helpers import write_released_weights, write_tiny_model

            scheduler = "rflow" if name == "rflow-ct" else "ddpm"
            if self.tiny:
                spec_path, weights = write_tiny_model(self.work / f"tiny-{scheduler}", scheduler,
                                                      mask_generator=scheduler == "rflow")
                self._models[name] = (str(spec_path), weights)
            else:
                weights = self.work / f"weights-{name}"
                write_released_weights(get_model(name), weights, with_mask_generator=name == "rflow-ct")
                self._models[name] = (name, weights)
        return self._models[name]

    def spec(self, name: str):
        from maisi_cli.models import get_model

        return get_model(self.model(name)[0])

    # --- one generation through the engine ---------------------------------------------------------------------------
    def engine_run(self, run_id: str, model: str, profile: str, size: tuple[int, int, int], steps: int,
                   levers: str | None = None) -> dict[str, Any]:
        """One sample through `Generator.plan_run` + `run` (bench/gpu_table3.run_once: per-stage seconds and peaks,
        the planner's prediction), with MAISI_LEVERS = `levers`; adds the sidecar's lever record, the planner's
        per-stage prediction beside the measured peaks, and the output image's path."""
        import torch

        model_arg, weights = self.model(model)
        row = {"id": run_id, "profile": profile, "size": list(size)}
        settings = argparse.Namespace(tiny=self.tiny, steps=steps)
        if levers and ("compile" in levers or "cuda_graphs" in levers):
            torch._dynamo.reset()  # each run builds new networks: start from an empty graph cache (no stale guards)
        with use_levers(levers):
            result = gpu_table3.run_once(row, "torch", settings, model_arg, weights, self.work, self.cuda)
        result["size_run"] = list(gpu_table3.TINY_SIZE if self.tiny else size)
        result["profile"] = profile
        result["steps"] = steps
        out = self.work / f"out_{run_id}_torch"
        sidecars = [p for p in sorted(out.glob("*.json")) if "sample_seed" in p.read_text()]
        if sidecars:
            sidecar = json.loads(sidecars[0].read_text())
            result["levers"] = sidecar.get("backend", {}).get("levers")
            images = sorted(out.glob("*image*"))
            result["image_path"] = str(images[0]) if images else None
        compile_s = sum((result.get("levers") or {}).get("compile_s", {}).values())
        if compile_s and result["timings_s"].get("denoise") is not None:
            result["timings_s"]["compile"] = round(compile_s, 3)
            result["timings_s"]["denoise_without_compile"] = round(result["timings_s"]["denoise"] - compile_s, 3)
        return result


# --- parts -----------------------------------------------------------------------------------------------------------
def part_environment(check: Check) -> dict[str, Any]:
    import monai
    import torch

    document: dict[str, Any] = {"torch": torch.__version__, "monai": monai.__version__,
                                "python": platform.python_version(), "cpu_count": os.cpu_count(),
                                "machine": platform.machine(),
                                "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    if check.cuda:
        _, start_s = timed(True, lambda: torch.zeros(1, device="cuda"))
        properties = torch.cuda.get_device_properties(0)
        document.update({"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version(), "memory_gib": round(properties.total_memory / GIB, 2),
                         "capability": list(torch.cuda.get_device_capability(0)),
                         "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
                         "cuda_start_s": start_s})
    else:
        _, start_s = timed(False, lambda: torch.zeros(1))
        document.update({"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "cuda_start_s": start_s,
                         "memory_gib": None})
    return document


def part_fp16_flash(check: Check) -> dict[str, Any]:
    """Flash attention and norm_float16 as the engine builds the networks for fp16 on CUDA (bf16 on the CPU, where
    both are off: MONAI refuses flash attention without CUDA, norm_float16 is fp16 only)."""
    import torch

    from maisi_cli.decode_plan import make_decode_plan
    from maisi_cli.engine.decode import LatentDecoder, decode_latents
    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.sampling import autocast_for
    from tests.helpers import fill_random

    spec = check.spec("rflow-ct")
    precision = "fp16" if check.cuda else "bf16"
    device = torch.device(check.device)
    unet = build_network(spec, "diffusion_unet", device, precision)
    fill_random(unet, 0)
    unet = unet.to(device)
    flash = [m.use_flash_attention for m in unet.modules() if hasattr(m, "use_flash_attention")]
    latent = (8, 8, 8) if check.tiny else (64, 64, 64)
    channels = spec.latent_shape((4, 4, 4))[0]
    x = torch.randn(1, channels, *latent, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"timesteps": torch.tensor([500.0], device=device),
              "spacing_tensor": torch.tensor([[150.0, 150.0, 200.0]], device=device)}
    if spec.uses_modality:
        inputs["class_labels"] = torch.tensor([spec.modality_id], device=device)
    document: dict[str, Any] = {"precision": precision, "latent": list(latent),
                                "unet_attention_blocks": len(flash), "unet_flash_attention": sum(flash)}
    with torch.inference_mode():
        reference, document["unet_fp32_s"] = timed(check.cuda, lambda: unet(x=x, **inputs).float())
        with autocast_for(device, precision):
            unet(x=x, **inputs)  # warm-up of the autocast path
            half, document["unet_autocast_s"] = timed(check.cuda, lambda: unet(x=x, **inputs).float())
    scale = reference.abs().max().clamp_min(1e-12)
    document["unet_relative_difference"] = float((half - reference).abs().max() / scale)
    unet = reference = half = None  # free them before the VAE
    vae = build_network(spec, "autoencoder", device, precision)
    fill_random(vae, 1)
    norm16 = [m.norm_float16 for m in vae.modules() if hasattr(m, "norm_float16")]
    document.update({"vae_group_norms": len(norm16), "vae_norm_float16": sum(norm16)})
    decoder = LatentDecoder(vae, torch.tensor(1.0)).to(device)
    z_shape = (4, 4, 4) if check.tiny else (32, 32, 32)
    z = torch.randn(1, channels, *z_shape, generator=torch.Generator().manual_seed(1)).to(device)
    whole = make_decode_plan(z_shape, z_shape, 0.4, 1)  # the engine's decode, whole, without TP splits
    decode_latents(decoder, z, whole, precision=precision)  # warm-up (cuDNN, autocast caches)
    image, document["vae_decode_autocast_s"] = timed(check.cuda,
                                                     lambda: decode_latents(decoder, z, whole, precision=precision))
    document["vae_decode_latent"] = list(z_shape)
    document["vae_decode_finite"] = bool(torch.isfinite(image).all())
    document["peak"] = cuda_peak(check.cuda)
    return document


def part_generation(check: Check, model: str, steps: int) -> dict[str, Any]:
    size = (256, 256, 256)
    result = check.engine_run(f"{model}-80g", model, "80g", size, steps)
    return {"runs": [result]}


def part_mask_generation(check: Check) -> dict[str, Any]:
    import torch

    from maisi_cli.engine.decode import LatentDecoder, decode_latents
    from maisi_cli.engine.masks.generation import channels_to_labels, sample_mask_latents
    from maisi_cli.engine.networks import build_network, build_scheduler
    from maisi_cli.engine.sampling import initial_noise
    from maisi_cli.profiles import get_profile
    from tests.helpers import fill_random

    spec = check.spec("rflow-ct")
    precision = "fp16" if check.cuda else "fp32"
    device = torch.device(check.device)
    unet = build_network(spec, "mask_generation_diffusion", device, precision)
    fill_random(unet, 3)
    vae = build_network(spec, "mask_generation_autoencoder", device, precision)
    fill_random(vae, 4)
    unet, decoder = unet.to(device), LatentDecoder(vae, torch.tensor(1.0)).to(device)
    scheduler = build_scheduler(spec, "mask_generation_noise_scheduler")
    steps = check.options.mask_steps or (10 if check.tiny else 1000)
    latent_shape = tuple(int(v) for v in spec.network["mask_generation_latent_shape"])
    native = tuple(s * 4 for s in latent_shape[1:])
    condition = [0.0] * 10
    reset_peak(check.cuda)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    noise = initial_noise(latent_shape, 0).to(device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(1)
    latents, denoise_s = timed(check.cuda, lambda: sample_mask_latents(unet, scheduler, condition, noise, steps,
                                                                         precision, generator))
    denoise_peak = cuda_peak(check.cuda)
    reset_peak(check.cuda)
    plan = get_profile("cpu" if check.tiny else "24g").decode_plan(latent_shape[1:], native)
    logits, decode_s = timed(check.cuda,
                             lambda: decode_latents(decoder, latents, plan, precision=precision, clip=False))
    labels = channels_to_labels(torch.argmax(logits, dim=1)[0].numpy())
    return {"steps": steps, "latent": list(latent_shape), "mask_size": list(native), "precision": precision,
            "denoise_s": denoise_s, "ms_per_step": round(1000 * denoise_s / steps, 2), "decode_s": decode_s,
            "decode_plan": plan.model_dump(), "labels_present": int(len(set(labels.ravel().tolist()))),
            "latents_finite": bool(torch.isfinite(latents).all()),
            "peak": {"denoise": denoise_peak, "decode": cuda_peak(check.cuda)}}


def step_seconds(run: Callable) -> tuple[float, list[float]]:
    """Median seconds between consecutive `train` step events after the first (warm-up), and all gaps."""
    stamps: list[float] = []

    def on_event(event) -> None:
        if event.stage == "train":
            stamps.append(time.perf_counter())

    run(on_event)
    gaps = [round(b - a, 4) for a, b in zip(stamps, stamps[1:])]
    measured = gaps[1:] or gaps
    return (round(statistics.median(measured), 4) if measured else float("nan")), gaps


def part_trainers(check: Check) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    from maisi_cli.engine.train.controlnet import ControlNetTrainConfig, train_controlnet
    from maisi_cli.engine.train.diffusion import DiffusionTrainConfig, train_diffusion
    from maisi_cli.engine.train.vae import VaeTrainConfig, train_vae
    from tests.helpers import write_mask

    model, weights = check.model("rflow-ct")
    steps = 1 if check.tiny else check.options.train_steps
    image = 32 if check.tiny else 128
    latent = image // 4
    data = check.work / "train-data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images, latents = [], []
    for k in range(steps + 1):
        volume = rng.normal(-300, 300, (image,) * 3).clip(-1000, 1000).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 1.5, 1.0])), str(data / f"ct{k}.nii.gz"))
        images.append({"image": f"ct{k}.nii.gz", "fold": 1})
        name = f"case{k}_emb.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(0, 1, (latent,) * 3 + (4,)).astype(np.float32),
                                 np.diag([6.0, 6.0, 6.0, 1.0])), str(data / name))
        (data / f"{name}.json").write_text(json.dumps({"dim": [latent] * 3, "spacing": [1.5] * 3}))
        write_mask(data / f"case{k}_label.nii.gz", (image,) * 3, (1.5, 1.5, 1.5))
        latents.append({"image": name, "label": f"case{k}_label.nii.gz"})
    (data / "images.json").write_text(json.dumps({"training": images}))
    (data / "embeddings.json").write_text(json.dumps({"training": latents}))
    common = {"model": model, "device": check.device, "epochs": 1, "amp": True}
    def vae(out: Path, on_event: Callable) -> Any:
        return train_vae(VaeTrainConfig(
            data=data / "images.json", out=out, patch_size=[16 if check.tiny else 64] * 3, perceptual_weight=0.0,
            discriminator_layers=2 if check.tiny else 3, random_aug=False, warmup=False, val_fold=None,
            **common), on_event)

    def diffusion(out: Path, on_event: Callable) -> Any:
        return train_diffusion(DiffusionTrainConfig(data=data / "embeddings.json", out=out, **common), on_event)

    def controlnet(out: Path, on_event: Callable) -> Any:
        return train_controlnet(ControlNetTrainConfig(data=data / "embeddings.json", out=out, weights_dir=weights,
                                                      **common), on_event)

    document: dict[str, Any] = {"amp": "fp16 autocast + GradScaler" if check.cuda else "bf16 autocast (CPU)",
                                "image": image, "latent": latent, "steps": steps + 1, "networks": {}}
    for name, train in (("vae", vae), ("diffusion", diffusion), ("controlnet", controlnet)):
        estimate = 5 if check.tiny else 20
        if not check.budget.allows(estimate):
            document["networks"][name] = {"skipped": check.budget.reason(estimate)}
            continue
        reset_peak(check.cuda)
        try:
            median, gaps = step_seconds(lambda on_event: train(check.work / f"train-{name}", on_event))
            document["networks"][name] = {"status": "ok", "s_per_step": median, "step_gaps_s": gaps,
                                          "peak": cuda_peak(check.cuda)}
        except Exception as error:  # OOM, a trainer's refusal: recorded, the other trainers still run
            document["networks"][name] = {"status": f"failed: {type(error).__name__}: {str(error)[:300]}"}
    return document


def part_fid(check: Check) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np
    import torch

    from maisi_cli.engine.fid import RadImageNetResNet50

    size = 16 if check.tiny else 128
    folder = check.work / "fid"
    for group in ("real", "synth"):
        (folder / group).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            rng = np.random.default_rng(hash((group, k)) % 2**32)
            data = rng.normal(-200 if group == "real" else -150, 400, (size,) * 3).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / group / f"v{k}.nii.gz"))
    weights = folder / "RadImageNet-ResNet50_notop.pth"
    torch.manual_seed(0)
    torch.save(RadImageNetResNet50().state_dict(), weights)
    executable = Path(sys.executable).parent / "maisi"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "maisi_cli"]
    command += ["fid", str(folder / "real"), str(folder / "synth"), "--extractor", str(weights), "--target-shape",
                f"{size}x{size}x{size}", "--device", check.device, "--json"]
    if check.tiny:
        command += ["--planes", "xy"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = round(time.perf_counter() - start, 3)
    if done.returncode != 0:
        raise RuntimeError(f"maisi fid exited {done.returncode}: {done.stderr[-500:]}")
    result = json.loads(done.stdout)
    return {"volumes": 4, "size": size, "device": check.device, "seconds": seconds,
            "seconds_per_volume": round(seconds / 4, 3), "fid": result.get("fid", result)}


def part_e2e_512(check: Check) -> dict[str, Any]:
    runs = []
    size = (512, 512, 512)
    variants = [("16g", None)]
    if check.options.e2e_levers:
        variants += [("16g", check.options.e2e_levers)]
    for profile, levers in variants:
        compiles = bool(levers) and ("compile" in levers or "cuda_graphs" in levers)
        estimate = (4 if check.tiny else 45) + (COMPILE_ESTIMATE_S if compiles and not check.tiny else 0)
        label = f"{profile}-512x512x512" + (f" levers {levers}" if levers else " plain torch")
        if not check.budget.allows(estimate):
            runs.append({"label": label, "skipped": check.budget.reason(estimate)})
            continue
        result = check.engine_run(f"e2e-{profile}-{'levers' if levers else 'plain'}", "rflow-ct", profile, size,
                                  check.steps, levers)
        result["label"] = label
        if check.cuda:
            t = result["timings_s"]
            result["goal"] = {**GOAL, "end_to_end_met": (t.get("end_to_end") or 1e9) <= GOAL["end_to_end_s"],
                              "peak_met": (result.get("peak_allocated_gib") or 1e9) <= GOAL["peak_allocated_gib"]}
        runs.append(result)
    return {"runs": runs, "goal": GOAL}


def image_difference(path: str | None, reference: str | None) -> dict[str, float] | None:
    """Max and mean |HU difference| of an output image to plain torch's."""
    if not path or not reference:
        return None
    import nibabel as nib
    import numpy as np

    a = np.asarray(nib.load(path).dataobj, dtype=np.int32)
    b = np.asarray(nib.load(reference).dataobj, dtype=np.int32)
    if a.shape != b.shape:
        return None
    difference = np.abs(a - b)
    return {"max_hu": int(difference.max()), "mean_hu": round(float(difference.mean()), 4)}


def part_levers(check: Check, variants: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    rows = {row["id"]: row for row in gpu_table3.table3_rows()}
    row = rows[check.options.lever_row]
    runs: list[dict[str, Any]] = []
    plain_image = None
    for label, text in variants:
        compiles = "compile" in text or "cuda_graphs" in text
        if check.tiny and compiles:
            text += ",compile_backend=eager"  # the wiring on the CPU without minutes of code generation
        estimate = (3 if check.tiny else ESTIMATE_S["levers"]) + (
            COMPILE_ESTIMATE_S if compiles and check.cuda else 10 if compiles else 0)
        if not check.budget.allows(estimate):
            runs.append({"label": label, "levers_asked": text, "skipped": check.budget.reason(estimate)})
            continue
        result = check.engine_run(f"levers-{label}", "rflow-ct", row["profile"], tuple(row["size"]),
                                  check.lever_steps, text)
        result.update({"label": label, "levers_asked": text})
        if label == "plain":
            plain_image = result.get("image_path")
        else:
            result["image_difference_to_plain"] = image_difference(result.get("image_path"), plain_image)
        runs.append(result)
    plain = next((r for r in runs if r.get("label") == "plain" and "timings_s" in r), None)
    if plain:
        for run in runs:
            if "timings_s" in run and run is not plain:
                run["speedup_vs_plain"] = {
                    stage: round(plain["timings_s"][stage] / run["timings_s"][key], 3)
                    for stage, key in (("denoise", "denoise_without_compile" if "denoise_without_compile"
                                        in run["timings_s"] else "denoise"), ("decode", "decode"),
                                       ("end_to_end", "end_to_end"))
                    if plain["timings_s"].get(stage) and run["timings_s"].get(key)}
    return {"row": row["id"], "steps": check.lever_steps, "runs": runs}


def part_table3(check: Check) -> dict[str, Any]:
    rows = gpu_table3.table3_rows()
    if check.tiny:
        rows = [rows[0], rows[-1]]
    previous = {}
    path = HERE / "results" / "gpu_table3.json"
    if path.exists():  # the last measured end-to-end seconds of each row guard the budget
        for entry in json.loads(path.read_text())["rows"]:
            for result in entry.get("results", []):
                if result.get("backend") == "torch" and result.get("timings_s"):
                    previous[entry["id"]] = result["timings_s"].get("end_to_end")
    out = []
    for row in rows:
        estimate = 3 if check.tiny else 1.3 * (previous.get(row["id"]) or 60)
        if not check.budget.allows(estimate):
            out.append({"id": row["id"], "published": row["published"], "skipped": check.budget.reason(estimate)})
            continue
        result = check.engine_run(f"table3-{row['id']}", "rflow-ct", row["profile"], tuple(row["size"]),
                                  check.steps)
        published = (row["published"]["time_rflow_ddpm"] or "").split("/")[0].strip().rstrip("s").strip()
        result["published"] = row["published"]
        generate = result["timings_s"].get("generate")
        if published and generate is not None:
            result["faster_than_published"] = generate < float(published)
        if check.cuda and result.get("peak_allocated_gib") is not None and row["published"]["peak_gib"]:
            result["peak_below_published"] = result["peak_allocated_gib"] <= row["published"]["peak_gib"]
        out.append({"id": row["id"], **result})
    return {"rows": out}


# --- the refit rows and the report ---------------------------------------------------------------------------------
def engine_runs(document: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for part in document["parts"].values():
        for key in ("runs", "rows"):
            for run in part.get(key, []) if isinstance(part, dict) else []:
                if isinstance(run, dict) and "timings_s" in run:
                    found.append(run)
    return found


def refit_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured peaks per engine run beside the planner's prediction, in bench/memory_fit.py --measured's form.
    Runs with compile or CUDA graphs are left out (their memory pools are not what the planner models)."""
    rows = []
    for run in engine_runs(document):
        plan = run.get("decode_plan")
        stages = run.get("peak_memory_gib") or {}
        on = (run.get("levers") or {}).get("on", [])
        if not plan or run.get("peak_allocated_gib") is None or any(
                name.startswith(("compile", "cuda_graphs")) for name in on):
            continue
        predicted = run.get("predicted") or {}
        rows.append({"size": run["size_run"], "roi": plan["roi"], "overlap": plan["overlap"],
                     "tp_splits": plan["tp_splits"], "profile": run.get("profile"), "levers": on,
                     "peak_gib": run["peak_allocated_gib"], "peak_reserved_gib": run.get("peak_reserved_gib"),
                     "measured": {stage: stages.get(stage) for stage in ("load", "denoise", "decode")},
                     "predicted_gib": predicted.get("peak_gib"), "predicted_stage": predicted.get("peak_stage"),
                     "predicted_diffusion_gib": predicted.get("diffusion_gib"),
                     "predicted_decode_gib": predicted.get("decode_gib")})
    return rows


def value(v: Any, spec: str = ".2f", unit: str = "") -> str:
    return "–" if v is None else f"{format(v, spec)}{unit}" if isinstance(v, (int, float)) else str(v)


def run_line(run: dict[str, Any]) -> str:
    if run.get("skipped"):
        return f"| {run.get('label') or run.get('id')} | skipped: {run['skipped']} | | | | | | | |"
    t = run.get("timings_s", {})
    peaks = run.get("peak_memory_gib") or {}
    plan = run.get("decode_plan") or {}
    decode = f"{plan.get('mode', '–')} {'×'.join(map(str, plan.get('roi', [])))}, ov {plan.get('overlap', '–')}, " \
             f"{plan.get('windows', '–')} win, TP {plan.get('tp_splits', '–')}" if plan else "–"
    levers = ", ".join((run.get("levers") or {}).get("on", [])) or "none"
    difference = run.get("image_difference_to_plain") or {}
    return (f"| {run.get('label') or run.get('id')} | {levers} | {decode} | "
            f"{value(t.get('load'), '.1f')} / {value(t.get('denoise'), '.1f')} / {value(t.get('decode'), '.1f')} / "
            f"{value(t.get('write'), '.1f')} | {value(t.get('compile'), '.1f')} | "
            f"{value(t.get('end_to_end'), '.1f')} | "
            f"{value(peaks.get('denoise', {}).get('allocated_gib'))} / "
            f"{value(peaks.get('decode', {}).get('allocated_gib'))} / {value(run.get('peak_reserved_gib'))} "
            f"(pred. {value((run.get('predicted') or {}).get('peak_gib'))}) | "
            f"{value(difference.get('max_hu'), 'd')} | {run.get('status', '')} |")


def markdown(document: dict[str, Any]) -> str:
    lines = [f"# GPU check ({document['device']})", "", document["what"], "",
             f"Wall time {value(document.get('wall_s'), '.0f')} s of a {value(document['budget_s'], '.0f')} s "
             "budget.", "",
             "Seconds per stage from the sample's sidecar; peaks are torch.cuda.max_memory_allocated per stage (reset "
             "before each); `compile s` is the first calls' time (compilation), also inside denoise.", ""]
    header = ("| run | levers on | decode plan | s: load / denoise / decode / write | compile s | end to end s | "
              "GiB: denoise / decode / reserved (predicted) | max \\|ΔHU\\| vs plain | status |")
    rule = "|---|---|---|---|---|---|---|---|---|"
    for name in PARTS:
        part = document["parts"].get(name)
        if part is None:
            continue
        lines += [f"## {name}", ""]
        if part.get("skipped"):
            lines += [f"skipped: {part['skipped']}", ""]
            continue
        if part.get("status", "ok") != "ok":
            lines += [f"{part['status']}", ""]
            continue
        runs = part.get("runs") or part.get("rows")
        if runs and any("timings_s" in r or r.get("skipped") for r in runs):
            lines += [header, rule] + [run_line(r) for r in runs]
            if name == "table3":
                lines += ["", "| row | generate s (published rflow / ddpm, A100) | peak allocated GiB (published) |",
                          "|---|---|---|"]
                for r in runs:
                    if "timings_s" in r:
                        lines.append(f"| {r['id']} | {value(r['timings_s'].get('generate'), '.1f')} "
                                     f"({r['published']['time_rflow_ddpm']}) | {value(r.get('peak_allocated_gib'))} "
                                     f"({value(r['published']['peak_gib'], '.1f')}) |")
            lines.append("")
            continue
        flat = {k: v for k, v in part.items() if k not in ("status", "seconds")}
        lines += ["```json", json.dumps(flat, indent=1, default=str)[:3000], "```", ""]
    refit = document.get("planner_refit", {})
    lines += ["## planner refit rows", "", f"{len(refit.get('rows', []))} rows; refit with "
              f"`{refit.get('command', '')}`", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", help=f"comma-separated parts (default: all): {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float,
                        help="stop starting parts/runs that would end after this many seconds (default 440; "
                             "none with --tiny)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tiny", action="store_true", help="every part on the CPU at tiny sizes (a smoke test)")
    parser.add_argument("--steps", type=int, help="denoising steps of the 512³, lever and Table 3 runs (default 30)")
    parser.add_argument("--rflow-steps", type=int, default=5)
    parser.add_argument("--ddpm-steps", type=int, default=5)
    parser.add_argument("--mask-steps", type=int, help="mask-generation steps (default 1000; 10 with --tiny)")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--lever-row", default="24g-512x512x128", help="Table 3 row the levers are measured on")
    parser.add_argument("--lever-steps", type=int, help="denoising steps of the lever runs (default 10)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (weights, outputs)")
    parser.add_argument("--e2e-levers", default="cudnn_benchmark,channels_last",
                        help="MAISI_LEVERS of the third 512³ run ('' for none)")
    options = parser.parse_args(argv)

    import torch

    if not options.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU, or pass --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    parts = list(PARTS)
    if options.parts:
        parts = [p.strip() for p in options.parts.split(",") if p.strip()]
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            print(f"gpu_check: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}", file=sys.stderr)
            return 2
    if options.lever_row not in {row["id"] for row in gpu_table3.table3_rows()}:
        print(f"gpu_check: --lever-row {options.lever_row} is not a Table 3 row id (e.g. 24g-512x512x128)",
              file=sys.stderr)
        return 2
    if options.tiny:
        options.rflow_steps = options.ddpm_steps = 2
    if options.budget_s is None:
        options.budget_s = float("inf") if options.tiny else 440.0
    check = Check(options)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "environment": lambda: part_environment(check),
        "fp16_flash": lambda: part_fp16_flash(check),
        "rflow_ct": lambda: part_generation(check, "rflow-ct", options.rflow_steps),
        "ddpm_ct": lambda: part_generation(check, "ddpm-ct", options.ddpm_steps),
        "mask_generation": lambda: part_mask_generation(check),
        "trainers": lambda: part_trainers(check),
        "fid": lambda: part_fid(check),
        "e2e_512": lambda: part_e2e_512(check),
        "levers": lambda: part_levers(check, LEVER_VARIANTS),
        "levers_compile": lambda: part_levers(check, COMPILE_VARIANTS),
        "table3": lambda: part_table3(check),
    }
    environment = part_environment(check)
    document: dict[str, Any] = {
        "what": ("maisi GPU check: engine runs of rflow-ct/ddpm-ct (phantom mask, 1 sample, no QC, "
                 f"{'fp16' if check.cuda else 'fp32'}), random weights in the released layouts"
                 + ("; --tiny: the tiny test spec at 32³ on the CPU (a smoke test, not a measurement)"
                    if options.tiny else "")),
        "device": environment["device"], "tiny": options.tiny,
        "budget_s": options.budget_s if options.budget_s != float("inf") else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {},
    }
    stem = "gpu_check_tiny" if options.tiny else "gpu_check"
    options.out.mkdir(parents=True, exist_ok=True)
    command = f"python bench/memory_fit.py --measured bench/results/{stem}_refit_rows.json"

    def write() -> None:
        document["wall_s"] = round(time.perf_counter() - check.budget.started, 1)
        document["planner_refit"] = {"rows": refit_rows(document), "command": command,
                                     "note": "peak_gib is the measured peak allocated (torch.cuda."
                                             "max_memory_allocated, per stage, the largest); reserved beside it"}
        (options.out / f"{stem}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
        (options.out / f"{stem}.md").write_text(markdown(document))
        (options.out / f"{stem}_refit_rows.json").write_text(
            json.dumps(document["planner_refit"]["rows"], indent=2) + "\n")

    try:
        run_parts(parts, check, runners, environment, document, write)
    finally:
        if not options.keep_work:  # random weights, volumes and outputs: hundreds of MB, several GB at full size
            shutil.rmtree(check.work, ignore_errors=True)
    print(options.out / f"{stem}.json")
    return 0


def run_parts(parts: list[str], check: Check, runners: dict[str, Callable[[], dict[str, Any]]],
              environment: dict[str, Any], document: dict[str, Any], write: Callable[[], None]) -> None:
    """Each part in turn, guarded by the budget; a failure is recorded and the next part runs."""
    for name in parts:
        estimate = 2 if check.tiny else ESTIMATE_S[name]
        if not check.budget.allows(estimate):
            document["parts"][name] = {"skipped": check.budget.reason(estimate)}
            print(f"{name}: skipped", file=sys.stderr)
            write()
            continue
        start = time.perf_counter()
        try:
            result = environment if name == "environment" else runners[name]()
            result = {"status": "ok", **result}
        except Exception as error:  # recorded; the next part still runs
            traceback.print_exc()  # into the call's log, for the next session
            result = {"status": f"failed: {type(error).__name__}: {str(error)[:400]}"}
        result["seconds"] = round(time.perf_counter() - start, 2)
        document["parts"][name] = result
        print(f"{name}: {result['status']} in {result['seconds']} s", file=sys.stderr)
        write()
        reset_peak(check.cuda)
    write()


if __name__ == "__main__":
    sys.exit(main())
