"""PyTorch against onnxruntime on the CPU, full-size rflow-ct networks, 64^3 image (latent 4x16^3).

Exports the UNet, the ControlNet (embedding + step graphs) and the VAE decoder with maisi's exporter
(engine/export.py: dynamo, opset 18, dynamic spatial axes), then times, alternating the backends:
- one denoising step = ControlNet step (condition embedded once, as the loop does) + UNet;
- one whole decode of the latent.
Random weights (MONAI's classes built from the released spec, `fill_random`): speed does not depend on the values.
Run it niced on a shared machine; a handful of repetitions, medians reported.

Usage: python bench/onnx_cpu.py [--size 64] [--steps 4] [--decodes 2]   → bench/results/onnx_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI (bench/omp_wait_policy.py); before torch loads
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image edge (a cube); the latent is size/4")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per backend (after one warm-up)")
    parser.add_argument("--decodes", type=int, default=2, help="timed decodes per backend (after one warm-up)")
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_cpu.json")
    args = parser.parse_args()

    import torch

    from maisi_cli.engine.backends import OnnxControlNet, OnnxDecoder, OnnxGraph, OnnxUNet
    from maisi_cli.engine.export import export_component
    from maisi_cli.engine.networks import build_network
    from maisi_cli.models import get_model
    from maisi_cli.engine.sampling import condition_embedded_once
    from tests.helpers import fill_random

    spec = get_model("rflow-ct")
    size = (args.size,) * 3
    latent = spec.latent_shape(size)
    networks = {}
    for i, name in enumerate(("diffusion_unet", "controlnet", "autoencoder")):
        network = build_network(spec, name)
        fill_random(network, i)
        networks[name] = network
    scale = torch.tensor(0.8)
    record: dict = {
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": "rflow-ct (random weights)", "image": list(size), "latent": list(latent), "export": {},
    }
    import onnx
    import onnxruntime

    record["machine"] |= {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    with tempfile.TemporaryDirectory(prefix="maisi-onnx-bench-") as folder:
        folder = Path(folder)
        for component in ("unet", "controlnet", "vae-decoder"):
            start = time.perf_counter()
            entry = export_component(component, networks, scale if component == "vae-decoder" else None, latent,
                                     spec, folder)
            record["export"][component] = {
                "seconds": round(time.perf_counter() - start, 1),
                "parts": {p["part"]: {"max_abs_diff": p["max_abs_diff"], "mb": round(p["bytes"] / 2**20, 1)}
                          for p in entry["parts"]}}
            print(f"exported {component}: {record['export'][component]}", file=sys.stderr)

        unet = OnnxUNet(OnnxGraph(folder / "unet.onnx"))
        controlnet = OnnxControlNet(OnnxGraph(folder / "controlnet_embedding.onnx"),
                                    OnnxGraph(folder / "controlnet.onnx"))
        decoder = OnnxDecoder(OnnxGraph(folder / "vae_decoder.onnx"))
        from maisi_cli.engine.decode import LatentDecoder
        from maisi_cli.engine.networks import set_tp_splits

        set_tp_splits(networks["autoencoder"], 1)
        torch_decoder = LatentDecoder(networks["autoencoder"], scale).eval()

        generator = torch.Generator().manual_seed(0)
        x = torch.randn((1, *latent), generator=generator)
        cond = (torch.rand((1, 8, *size), generator=generator) > 0.5).float()
        conditions = {"spacing_tensor": torch.tensor([[150.0, 150.0, 150.0]]), "class_labels": torch.tensor([1])}
        backends = {"torch": (networks["diffusion_unet"], networks["controlnet"], torch_decoder),
                    "onnxruntime": (unet, controlnet, decoder)}

        def step(pair, t):
            u, c = pair
            down, mid = c(x=x, timesteps=t, controlnet_cond=cond, class_labels=conditions["class_labels"])
            return u(x=x, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                     **conditions)

        steps = {name: [] for name in backends}
        outputs = {}
        with torch.inference_mode():
            caches = {name: condition_embedded_once(b[1], cond) for name, b in backends.items()}
            for cache in caches.values():
                cache.__enter__()
            try:
                for rep in range(args.steps + 1):
                    for name, (u, c, _) in backends.items():
                        t = torch.tensor([1000.0 * (1 - rep / (args.steps + 1))])
                        start = time.perf_counter()
                        outputs[name] = step((u, c), t)
                        if rep:  # the first call warms up (allocations, onnxruntime's first run)
                            steps[name].append(time.perf_counter() - start)
            finally:
                for cache in caches.values():
                    cache.__exit__(None, None, None)
            step_diff = float((outputs["torch"] - outputs["onnxruntime"]).abs().max())
            decodes = {name: [] for name in backends}
            images = {}
            for rep in range(args.decodes + 1):
                for name, (_, _, d) in backends.items():
                    start = time.perf_counter()
                    images[name] = d(x)
                    if rep:
                        decodes[name].append(time.perf_counter() - start)
            decode_diff = float((images["torch"] - images["onnxruntime"]).abs().max())

    record["step_seconds"] = {name: {"median": round(statistics.median(v), 3), "runs": [round(s, 3) for s in v]}
                              for name, v in steps.items()}
    record["decode_seconds"] = {name: {"median": round(statistics.median(v), 3), "runs": [round(s, 3) for s in v]}
                                for name, v in decodes.items()}
    record["max_abs_diff"] = {"step_output": step_diff, "decoded_image": decode_diff,
                              "decoded_hu": round(decode_diff * 2000, 4)}
    record["speedup_onnxruntime"] = {
        "step": round(record["step_seconds"]["torch"]["median"] / record["step_seconds"]["onnxruntime"]["median"], 2),
        "decode": round(record["decode_seconds"]["torch"]["median"]
                        / record["decode_seconds"]["onnxruntime"]["median"], 2)}
    record["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
