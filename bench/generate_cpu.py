"""CPU generation with the full-size rflow-ct networks at a 64^3 (or --size) image, 30 steps: the `maisi generate`
engine against a bare loop of the same MONAI network calls. The bare loop embeds the ControlNet condition once per
sample, as the engine does (`--bare-embeds-per-step`: every step, MONAI's plain forward), so the difference is the
engine's overhead, not a difference of algorithm.

Reports, per run: wall time of the whole process, peak RSS, and the denoise and decode seconds; the engine's
overhead = (engine denoise + decode) / (bare loop + bare decode) - 1 (goal < 5 %). Runs alternate to share the
machine's noise. The weights are random (released layout, written once to a cache folder): speed does not depend
on their values.

Usage: python bench/generate_cpu.py [--runs 3] [--size 64] [--steps 30]   → bench/results/generate_cpu_{size}{tag}.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))

BARE_LOOP = r'''
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.schedulers import RFlowScheduler

weights, size, steps, spec_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
embed_once = sys.argv[5] == "once"
bf16 = sys.argv[6] == "bf16"
net = json.load(open(spec_path))["network"]
def kwargs(block, **over):
    out = {k: (net[v[1:]] if isinstance(v, str) and v.startswith("@") else v) for k, v in net[block].items() if k != "_target_"}
    out.update(over); return out
vae = AutoencoderKlMaisi(**kwargs("autoencoder_def", norm_float16=False, num_splits=1)).eval()
unet = DiffusionModelUNetMaisi(**kwargs("diffusion_unet_def", use_flash_attention=False)).eval()
cnet = ControlNetMaisi(**kwargs("controlnet_def", use_flash_attention=False)).eval()
vae.load_state_dict(torch.load(f"{weights}/models/autoencoder_v1.pt", weights_only=True, mmap=True))
ck = torch.load(f"{weights}/models/diff_unet_3d_rflow-ct.pt", weights_only=True, mmap=True)
unet.load_state_dict(ck["unet_state_dict"]); scale = ck["scale_factor"]
cnet.load_state_dict(torch.load(f"{weights}/models/controlnet_3d_rflow-ct.pt", weights_only=True, mmap=True)["controlnet_state_dict"])
sched = RFlowScheduler(**{k: v for k, v in net["noise_scheduler"].items() if k != "_target_"})
label = torch.zeros(1, 1, size, size, size, dtype=torch.long); label[..., size//8:-size//8, size//8:-size//8, :] = 200
cond = ((label >> torch.arange(8).view(1, 8, 1, 1, 1)) & 1).float()
spacing = torch.tensor([[150.0, 150.0, 150.0]]); modality = torch.tensor([1])
lat = size // 4
torch.manual_seed(0); x = torch.randn(1, 4, lat, lat, lat)
sched.set_timesteps(num_inference_steps=steps, input_img_size_numel=lat ** 3)
ts = sched.timesteps; nts = torch.cat((ts[1:], torch.tensor([0], dtype=ts.dtype)))
t1 = time.perf_counter()
import contextlib
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
with torch.inference_mode(), autocast:
    if embed_once:  # the condition embedding does not depend on t: the same shortcut the engine takes
        class Fixed(torch.nn.Module):
            def __init__(self, value): super().__init__(); self.value = value
            def forward(self, _): return self.value
        cnet.controlnet_cond_embedding = Fixed(cnet.controlnet_cond_embedding(cond))
    for t, nt in zip(ts, nts):
        tt = torch.tensor([float(t)])
        down, mid = cnet(x=x, timesteps=tt, controlnet_cond=cond, class_labels=modality)
        v = unet(x=x, timesteps=tt, spacing_tensor=spacing, class_labels=modality,
                 down_block_additional_residuals=down, mid_block_additional_residual=mid)
        x, _ = sched.step(v, t, x, nt)
    t2 = time.perf_counter()
    image = torch.clip(vae.decode_stage_2_outputs(x / scale), 0, 1)
t3 = time.perf_counter()
print(json.dumps({"denoise_s": t2 - t1, "decode_s": t3 - t2, "setup_s": t1 - t0}))
'''


def run_measured(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stdout) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args[:3]} failed")
    return wall, usage.ru_maxrss / 1e6, stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "maisi-bench-weights")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both sides: fp32, or bf16 autocast (the cpu profile's default where the CPU has bf16)")
    parser.add_argument("--bare-embeds-per-step", action="store_true",
                        help="the bare loop embeds the ControlNet condition every step, as MONAI's forward does "
                             "(default: once per sample, as the engine)")
    options = parser.parse_args()

    from maisi_cli.models import get_model
    from tests.helpers import write_mask, write_released_weights

    spec = get_model("rflow-ct")
    if not (options.weights / spec.weights["controlnet"]).exists():
        write_released_weights(spec, options.weights)
    work = Path(tempfile.mkdtemp(prefix="maisi-bench-"))
    size = options.size
    mask = write_mask(work / "mask.nii.gz", (size,) * 3, (1.5,) * 3)
    spec_path = ROOT / "maisi_cli/resources/models/rflow-ct.json"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "MAISI_HOME": str(work / "home")}
    maisi = [sys.executable, "-m", "maisi_cli"]

    engine_runs, bare_runs = [], []
    for run in range(options.runs):
        wall, rss, out = run_measured([sys.executable, "-c", BARE_LOOP, str(options.weights), str(size),
                                       str(options.steps), str(spec_path),
                                       "per-step" if options.bare_embeds_per_step else "once", options.precision], env)
        bare = json.loads(out)
        bare_runs.append({"wall_s": wall, "peak_rss_gb": rss, **bare})

        out_dir = work / f"out{run}"
        wall, rss, out = run_measured(
            [*maisi, "--quiet", "--json", "generate", "--no-qc", "--weights-dir", str(options.weights), "--mask", str(mask),
             "--size", str(size), "--spacing", "1.5", "--allow-any-size", "--steps", str(options.steps),
             "--precision", options.precision,
             "--out", str(out_dir)], env)
        timings = json.loads((out_dir / "sample_0000.json").read_text())["timings"]
        engine_runs.append({"wall_s": wall, "peak_rss_gb": rss, **timings})
        print(f"run {run}: bare {bare_runs[-1]['denoise_s']:.1f}+{bare_runs[-1]['decode_s']:.1f}s, "
              f"engine {timings['denoise_s']:.1f}+{timings['decode_s']:.1f}s, wall {bare_runs[-1]['wall_s']:.1f} / {wall:.1f}s",
              file=sys.stderr)

    def median(runs: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    engine_compute = median(engine_runs, "denoise_s") + median(engine_runs, "decode_s")
    bare_compute = median(bare_runs, "denoise_s") + median(bare_runs, "decode_s")
    per_run_overhead = [
        (e["denoise_s"] + e["decode_s"]) / (b["denoise_s"] + b["decode_s"]) - 1 for e, b in zip(engine_runs, bare_runs)
    ]
    results = {
        "what": f"rflow-ct full-size networks, {size}^3 image, {options.steps} steps, CPU {options.precision}, "
                "random weights",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads default",
        "omp_wait_policy": env["OMP_WAIT_POLICY"],
        "runs": options.runs,
        "bare_loop_condition_embedding": "per step" if options.bare_embeds_per_step else "once per sample",
        "engine": {k: median(engine_runs, k) for k in ("wall_s", "peak_rss_gb", "denoise_s", "decode_s")},
        "bare_loop": {k: median(bare_runs, k) for k in ("wall_s", "peak_rss_gb", "denoise_s", "decode_s", "setup_s")},
        "engine_overhead_pct": round(100 * (engine_compute / bare_compute - 1), 2),
        "engine_overhead_pct_per_run": [round(100 * o, 2) for o in per_run_overhead],
        "goal_overhead_pct": 5,
        "raw": {"engine": engine_runs, "bare_loop": bare_runs},
    }
    RESULTS.mkdir(exist_ok=True)
    precision_tag = "" if options.precision == "fp32" else f"_{options.precision}"
    (RESULTS / f"generate_cpu_{size}{precision_tag}{options.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
