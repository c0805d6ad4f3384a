"""Tile seams of the sliding-window VAE decode against a whole decode, on the CPU at small sizes.

A phantom (engine/phantoms.py, HU → [0, 1] as the VAE was trained) is encoded once (z = the encoder's mean); its
latent is decoded whole and by sliding window (engine/decode.decode_latents: MONAI SlidingWindowInferer, Gaussian
blending, 1 TP split, fp32, unclipped output) at each ROI × overlap. For each decode: the seam measures of
engine/seams.py (seam excess, seam scores of the sliding and the whole decode on the same border planes), max and
mean |sliding − whole| (image in [0, 1] units, ×2000 for HU), windows and seconds.

VAE (--vae):
  auto     the packaged demo VAE (maisi_cli/resources/demo/models/autoencoder.pt) when it exists, else `random`
  demo     the packaged demo VAE (demo spec architecture, trained on the phantoms)
  random   the full-size rflow-ct VAE architecture with small random weights (tests/helpers.fill_random)
  PATH     a checkpoint of the demo VAE architecture (e.g. a training run's autoencoder.pt)

The default grid is 64×64×128 (latent 16×16×32) with ROIs that span x and y and slide along z only (16×16×10 and
16×16×6), so every border plane is a full 64×64 plane; the ROI z sides are chosen so that each overlap gives a
different window placement (MONAI's interval int(roi·(1−overlap)) makes some overlaps coincide at small ROIs).

Usage: python bench/seams_cpu.py [--vae auto] [--size 64x64x128] [--rois 16x16x10,16x16x6]
       [--overlaps 0,0.125,0.25,0.4,0.5]   → bench/results/seams_cpu.json (runs merged by VAE label) + README section
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
sys.path.insert(0, str(ROOT))
SECTION = "## Tile seams of the sliding-window decode (`seams_cpu.py`)"


def parse_triple(text: str) -> tuple[int, int, int]:
    from maisi_cli.config import parse_size

    return parse_size(text, "--rois")


def load_vae(choice: str):
    """(autoencoder, label, description)."""
    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.weights import WeightFile, load_into, locate_weight
    from maisi_cli.errors import MaisiError
    from maisi_cli.models import get_model

    demo = get_model("demo")
    if choice == "auto":
        try:
            locate_weight(demo, "autoencoder", None)
            choice = "demo"
        except MaisiError:
            choice = "random"
    if choice == "random":
        from tests.helpers import fill_random

        spec = get_model("rflow-ct")
        network = build_network(spec, "autoencoder")
        fill_random(network, seed=0)
        return network, "rflow-ct-random", ("rflow-ct VAE architecture (channels 64/128/256, 2 res blocks per level), "
                                            "random weights (tests/helpers.fill_random, seed 0, scale 0.05)")
    if choice == "demo":
        weight = locate_weight(demo, "autoencoder", None)
        label, what = "demo", f"packaged demo VAE ({weight.path.name}, trained on the phantoms)"
    else:
        path = Path(choice).expanduser().resolve()
        weight = WeightFile("autoencoder", path.name, path, "path")
        label, what = f"demo-arch:{path.name}", f"demo VAE architecture, weights from {path}"
    network = build_network(demo, "autoencoder")
    load_into(network, weight, demo)
    return network, label, what + " (channels 16/32/64, 1 res block per level)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="auto")
    parser.add_argument("--size", default="64x64x128")
    parser.add_argument("--rois", default="16x16x10,16x16x6", help="latent voxels, comma-separated")
    parser.add_argument("--overlaps", default="0,0.125,0.25,0.4,0.5")
    parser.add_argument("--seed", type=int, default=3, help="phantom seed")
    parser.add_argument("--label", help="name of this run in the results (default: from --vae)")
    parser.add_argument("--note", default="", help="added to the VAE description (e.g. which training epoch)")
    parser.add_argument("--no-write", action="store_true")
    options = parser.parse_args()

    import numpy as np
    import torch

    from maisi_cli.config import parse_size
    from maisi_cli.engine.decode import LatentDecoder, decode_latents
    from maisi_cli.engine.networks import set_tp_splits
    from maisi_cli.engine.phantoms import default_spacing, make_phantom
    from maisi_cli.engine.seams import seam_report
    from maisi_cli.profiles import make_decode_plan

    size = parse_size(options.size)
    rois = [parse_triple(t) for t in options.rois.split(",") if t.strip()]
    overlaps = [float(t) for t in options.overlaps.split(",") if t.strip()]
    started = time.perf_counter()
    autoencoder, label, what = load_vae(options.vae)
    label, what = options.label or label, what + (f"; {options.note}" if options.note else "")
    decoder = LatentDecoder(autoencoder, torch.tensor(1.0)).eval()

    phantom = make_phantom(size, default_spacing(size), options.seed)
    image = torch.from_numpy(np.clip((phantom.image.astype(np.float32) + 1000.0) / 2000.0, 0.0, 1.0))[None, None]
    set_tp_splits(autoencoder, 1)  # the encoder's convolutions split too; the seams do not depend on it
    with torch.inference_mode():
        start = time.perf_counter()
        latents, _sigma = autoencoder.encode(image)
        encode_s = time.perf_counter() - start
    latent = tuple(int(s) for s in latents.shape[2:])
    print(f"{label}: latent {latent}, encode {encode_s:.1f} s", file=sys.stderr)

    whole_plan = make_decode_plan(latent, latent, 0.0, 1)
    start = time.perf_counter()
    whole = decode_latents(decoder, latents, whole_plan, clip=False)[0].numpy()
    whole_s = time.perf_counter() - start
    print(f"whole decode {whole_s:.1f} s", file=sys.stderr)
    rows = []
    for roi in rois:
        for overlap in overlaps:
            plan = make_decode_plan(latent, roi, overlap, 1)
            start = time.perf_counter()
            sliding = decode_latents(decoder, latents, plan, clip=False)[0].numpy()
            seconds = time.perf_counter() - start
            report = seam_report(sliding, whole, plan.roi, overlap)
            tiled = [a for a in range(3) if plan.roi[a] < latent[a]]
            overlap_voxels = min(plan.roi[a] - max(int(plan.roi[a] * (1 - overlap)), 1) for a in tiled)
            rows.append({"roi": list(plan.roi), "overlap": overlap, "overlap_latent_voxels": overlap_voxels,
                         "windows": plan.windows,
                         "seconds": round(seconds, 2), "time_vs_whole": round(seconds / whole_s, 2), **report})
            print(f"roi {plan.roi} overlap {overlap}: {plan.windows} windows, excess {report['seam_excess']}, "
                  f"max|Δ| {report['max_abs_diff']}, {seconds:.1f} s", file=sys.stderr)
    run = {
        "vae": what,
        "image_size": list(size),
        "latent": list(latent),
        "phantom_seed": options.seed,
        "decode": "engine/decode.decode_latents, fp32, 1 TP split, unclipped output (image units: [0, 1] = 2000 HU)",
        "encode_s": round(encode_s, 2),
        "whole_decode_s": round(whole_s, 2),
        "whole_output_range": [round(float(whole.min()), 4), round(float(whole.max()), 4)],
        "whole_mean_gradient": round(float(np.mean([np.abs(np.diff(whole, axis=a)).mean() for a in (1, 2, 3)])), 6),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in run.items() if k != "rows"}, indent=2))
    if options.no_write:
        return
    results = HERE / "results" / "seams_cpu.json"
    document = json.loads(results.read_text()) if results.exists() else {}
    document["what"] = ("seam excess = (mean |gradient| across tile-border planes of the sliding decode − "
                        "the same of the whole decode) / mean |gradient| of the whole decode across the other planes "
                        "of the same axes "
                        "(maisi_cli/engine/seams.py)")
    document.setdefault("runs", {})[label] = run
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(document, indent=2) + "\n")
    write_readme(document)


def write_readme(document: dict) -> None:
    def fmt(value, spec: str) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = [SECTION, "",
             "`python bench/seams_cpu.py [--vae auto|demo|random|PATH]` (→ `results/seams_cpu.json`). A phantom is "
             "encoded once and its latent decoded whole and by sliding window (`decode_latents`: MONAI's inferer, "
             "Gaussian blending, fp32, 1 TP split, unclipped). **Seam excess** (`maisi_cli/engine/seams.py`) = "
             "(mean |voxel-to-voxel difference| across the planes where windows start or end, of the sliding decode "
             "− of the whole decode on the same planes) / mean |difference| of the whole decode across the other "
             "planes of the same axes: 0 "
             "= no seam, 1 = the border planes jump by one typical voxel-to-voxel step more than they should. "
             "max/mean |Δ| are against the whole decode in image units ([0, 1] = 2000 HU).", ""]
    for label, run in document.get("runs", {}).items():
        lines += [f"**{label}**: {run['vae']}; image {'×'.join(map(str, run['image_size']))}, latent "
                  f"{'×'.join(map(str, run['latent']))}; whole decode {run['whole_decode_s']} s "
                  f"(CPU, {run['machine']}).", "",
                  "| ROI (latent) | overlap (latent voxels) | windows | seam excess (off the borders) | seam score sliding / whole | max \\|Δ\\| | "
                  "mean \\|Δ\\| | time vs whole |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in run["rows"]:
            lines.append(f"| {'×'.join(map(str, row['roi']))} | {row['overlap']:g} ({row['overlap_latent_voxels']}) | "
                         f"{row['windows']} | "
                         f"{fmt(row['seam_excess'], '.3f')} ({fmt(row.get('inside_excess'), '.3f')}) | {fmt(row['seam_score_sliding'], '.2f')} / "
                         f"{fmt(row['seam_score_whole'], '.2f')} | {fmt(row['max_abs_diff'], '.4f')} | "
                         f"{fmt(row['mean_abs_diff'], '.5f')} | {row['time_vs_whole']:.2f}× |")
        lines.append("")
    reading = document.get("reading")
    if reading:
        lines += [reading, ""]
    section = "\n".join(lines)
    readme = HERE / "README.md"
    text = readme.read_text()
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)


if __name__ == "__main__":
    main()
