"""Does `OMP_WAIT_POLICY=PASSIVE` help on this machine? Times a 30-step denoise + decode at a 64^3 image in fresh
processes, alternating the variable unset (libgomp's default) and PASSIVE: the tiny test networks, and (with
--full-size) the full-size rflow-ct networks through bench/generate_cpu.py's bare loop.

Usage: python bench/omp_wait_policy.py [--runs 10] [--full-size]
       → bench/results/omp_wait_policy.json (or omp_wait_policy_full_size.json)
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

CHILD = r'''
import sys, time, json
sys.path.insert(0, sys.argv[1])
import torch
from maisi_cli.engine.decode import LatentDecoder, decode_latents
from maisi_cli.engine.networks import build_network, build_scheduler
from maisi_cli.engine.sampling import denoise, initial_noise, label_bit_planes, schedule, spacing_condition, modality_condition
from maisi_cli.models import get_model
from maisi_cli.profiles import make_decode_plan
from tests.helpers import fill_random
spec = get_model(sys.argv[2])
nets = {}
for i, c in enumerate(("autoencoder", "diffusion_unet", "controlnet")):
    nets[c] = build_network(spec, c); fill_random(nets[c], i)
labels = torch.full((1, 1, 64, 64, 64), 200, dtype=torch.long)
cond = label_bit_planes(labels); m = modality_condition(1)
scheduler = build_scheduler(spec)
start = time.perf_counter()
with torch.inference_mode():
    z = denoise(nets["diffusion_unet"], nets["controlnet"], scheduler, initial_noise((4, 16, 16, 16), 0), cond,
                schedule(scheduler, 30, (16, 16, 16)), {"spacing_tensor": spacing_condition((1.0,) * 3), "class_labels": m},
                {"class_labels": m})
    decode_latents(LatentDecoder(nets["autoencoder"], torch.tensor(1.0)), z, make_decode_plan((16,) * 3, (16,) * 3, 0.25, 1))
print(json.dumps({"seconds": time.perf_counter() - start}))
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--full-size", action="store_true")
    options = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.helpers import tiny_spec_document

    spec_path = Path(tempfile.mkdtemp()) / "tiny.json"
    spec_path.write_text(json.dumps(tiny_spec_document()))
    command = [sys.executable, "-c", CHILD, str(ROOT), str(spec_path)]
    what = "tiny networks, 64^3 image, 30 steps + decode, 2 torch threads"
    if options.full_size:
        from bench.generate_cpu import BARE_LOOP
        from maisi_cli.models import get_model
        from tests.helpers import write_released_weights

        weights = Path(tempfile.gettempdir()) / "maisi-bench-weights"
        if not (weights / get_model("rflow-ct").weights["controlnet"]).exists():
            write_released_weights(get_model("rflow-ct"), weights)
        command = [sys.executable, "-c", BARE_LOOP, str(weights), "64", "30",
                   str(ROOT / "maisi_cli/resources/models/rflow-ct.json")]
        what = "full-size rflow-ct networks (random weights), 64^3 image, 30 steps + decode, 2 torch threads"
    seconds: dict[str, list[float]] = {"unset": [], "PASSIVE": []}
    for run in range(options.runs):
        for policy in seconds:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            timings = json.loads(done.stdout)
            seconds[policy].append(round(timings.get("seconds") or timings["denoise_s"] + timings["decode_s"], 3))
            print(run, policy, seconds[policy][-1], file=sys.stderr)
    summary = {
        policy: {"median_s": statistics.median(v), "max_s": max(v), "min_s": min(v),
                 "runs_over_2x_median_of_best": sum(x > 2 * min(min(s) for s in seconds.values()) for x in v),
                 "seconds": v}
        for policy, v in seconds.items()
    }
    results = {"what": what, "machine":
               f"{platform.machine()}, {os.cpu_count()} cores", "runs": options.runs, "results": summary}
    RESULTS.mkdir(exist_ok=True)
    name = "omp_wait_policy_full_size.json" if options.full_size else "omp_wait_policy.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
