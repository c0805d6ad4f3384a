"""TensorRT (MONAI trt_compile, maisi's shape-keyed engine cache) against PyTorch fp16 on one NVIDIA GPU.

For each image size (default 256^3 and 512^3), full-size rflow-ct networks with random weights:
- per step: ControlNet + UNet, median of the timed steps (PyTorch fp16 autocast vs TensorRT fp16 engines);
- end to end: the engine's denoise loop (engine/sampling.denoise, `--steps` steps) + decode_latents with the
  profile's decode plan; engine build time reported apart (first call at a new shape);
- peak memory: torch's max_memory_allocated, and the device's used memory (cudaMemGetInfo; TensorRT allocates
  outside torch's allocator) after each phase.
Engines land under MAISI_HOME/trt (default a temporary folder here, so a run measures the build).

Needs a GPU and TensorRT (`pip install 'maisi[trt]'`); without them it refuses in one line (exit 2).
`--tiny` is a smoke test that runs anywhere: the tiny test networks at 32^3, 2 steps, PyTorch (fp16 on a GPU,
fp32 on the CPU), and TensorRT only when it is there (else recorded as skipped).

Usage: python bench/gpu_trt.py [--sizes 256 512] [--steps 30] [--tiny]   → bench/results/gpu_trt[_tiny].json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI; before torch loads
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))


def trt_unavailable() -> str | None:
    """Why TensorRT cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from maisi_cli.engine.trt import tensorrt_version

    if tensorrt_version() is None:
        return "TensorRT is not installed (pip install 'maisi[trt]')"
    try:
        import polygraphy  # noqa: F401
    except Exception:
        return "polygraphy is not installed (pip install 'maisi[trt]')"
    return None


def build(spec, device, seed: int = 0) -> dict:
    from maisi_cli.engine.networks import build_network
    from tests.helpers import fill_random

    networks = {}
    for i, name in enumerate(("diffusion_unet", "controlnet", "autoencoder")):
        network = build_network(spec, name, device, "fp16" if device.type == "cuda" else "fp32")
        fill_random(network, seed + i)
        networks[name] = network.to(device)
    return networks


def memory(device) -> dict:
    import torch

    if device.type != "cuda":
        import resource

        return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "device_used_gib": round((total - free) / 2**30, 2)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_backend(name: str, spec, size, steps: int, device, precision: str, profile) -> dict:
    """Per-step and end-to-end timings of one backend at one size."""
    import torch

    from maisi_cli.engine.decode import LatentDecoder, decode_latents
    from maisi_cli.engine.networks import build_scheduler
    from maisi_cli.engine.sampling import autocast_for, condition_embedded_once, denoise, schedule

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    networks = build(spec, device)
    unet, controlnet, autoencoder = networks["diffusion_unet"], networks["controlnet"], networks["autoencoder"]
    decoder = LatentDecoder(autoencoder, torch.tensor(0.8)).to(device)
    if name == "trt":
        from maisi_cli.engine.trt import compile_component

        unet = compile_component(unet, "unet", "bench-random-0", precision)
        controlnet = compile_component(controlnet, "controlnet", "bench-random-1", precision)
        compile_component(autoencoder, "vae-decoder", "bench-random-2", precision)
    latent = spec.latent_shape(size)
    plan = profile.decode_plan(latent[1:], size, split_axis=int(spec.definition("autoencoder").get("dim_split", 1)),
                               spec=spec)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, *latent), generator=generator).to(device, dtype)
    cond = (torch.rand((1, 8, *size), generator=generator) > 0.5).float().to(device)
    unet_inputs = {"spacing_tensor": torch.tensor([[100.0, 100.0, 100.0]], device=device),
                   "class_labels": torch.tensor([1], device=device)}
    cn_inputs = {"class_labels": unet_inputs["class_labels"]}
    record: dict = {"decode": plan.model_dump()}

    def one_step(t):
        down, mid = controlnet(x=x, timesteps=t, controlnet_cond=cond, **cn_inputs)
        return unet(x=x, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    **unet_inputs)

    with torch.inference_mode(), autocast_for(device, precision), condition_embedded_once(controlnet, cond):
        start = time.perf_counter()
        one_step(torch.tensor([999.0], device=device))  # TensorRT: the engines are built here (first shape)
        sync(device)
        record["first_step_seconds"] = round(time.perf_counter() - start, 2)
        times = []
        for i in range(min(steps, 10)):
            start = time.perf_counter()
            one_step(torch.tensor([900.0 - 50 * i], device=device))
            sync(device)
            times.append(time.perf_counter() - start)
    record["step_seconds"] = {"median": round(statistics.median(times), 4), "runs": [round(t, 4) for t in times]}
    record["memory_after_steps"] = memory(device)

    scheduler = build_scheduler(spec)
    start = time.perf_counter()
    with torch.inference_mode():
        latents = denoise(unet, controlnet, scheduler, x.clone(), cond, schedule(scheduler, steps, latent[1:]),
                          unet_inputs, cn_inputs, precision=precision)
        sync(device)
        denoise_s = time.perf_counter() - start
        image = decode_latents(decoder, latents, plan, precision=precision)
        sync(device)
    total = time.perf_counter() - start
    record["end_to_end_seconds"] = {"denoise": round(denoise_s, 2), "decode": round(total - denoise_s, 2),
                                    "total": round(total, 2), "steps": steps}
    record["memory_peak"] = memory(device)
    record["image_finite"] = bool(torch.isfinite(image).all())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image edges (cubes)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="CPU-capable smoke test with the tiny test networks")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    why = trt_unavailable()
    if why is not None and not args.tiny:
        print(f"gpu_trt.py: needs an NVIDIA GPU with TensorRT ({why}); run with --tiny for a smoke test",
              file=sys.stderr)
        raise SystemExit(2)

    from maisi_cli.models import get_model
    from maisi_cli.engine.memory import resolve_profile

    os.environ.setdefault("MAISI_HOME", tempfile.mkdtemp(prefix="maisi-trt-bench-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "fp16" if device.type == "cuda" else "fp32"
    if args.tiny:
        from tests.helpers import tiny_spec_document

        spec_path = Path(os.environ["MAISI_HOME"]) / "tiny-rflow.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(tiny_spec_document()))
        spec, sizes, steps = get_model(str(spec_path)), [32], 2
    else:
        spec, sizes, steps = get_model("rflow-ct"), args.sizes, args.steps
    profile = resolve_profile("auto", str(device))
    record: dict = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "model": spec.name, "precision": precision, "profile": profile.name, "engine_cache": os.environ["MAISI_HOME"],
        "sizes": {},
    }
    if why is None:
        from maisi_cli.engine.trt import tensorrt_version

        record["machine"]["tensorrt"] = tensorrt_version()
    for edge in sizes:
        size = (edge, edge, edge)
        entry: dict = {"torch": run_backend("torch", spec, size, steps, device, precision, profile)}
        print(f"{edge}^3 torch: {entry['torch']['step_seconds']['median']} s/step", file=sys.stderr)
        if why is None:
            entry["trt"] = run_backend("trt", spec, size, steps, device, precision, profile)
            entry["speedup_trt"] = {
                "step": round(entry["torch"]["step_seconds"]["median"] / entry["trt"]["step_seconds"]["median"], 2),
                "end_to_end": round(entry["torch"]["end_to_end_seconds"]["total"]
                                    / entry["trt"]["end_to_end_seconds"]["total"], 2)}
        else:
            entry["trt"] = f"skipped: {why}"
        record["sizes"][f"{edge}^3"] = entry
    out = args.out or RESULTS / ("gpu_trt_tiny.json" if args.tiny else "gpu_trt.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
