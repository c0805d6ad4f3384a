"""Does `OMP_WAIT_POLICY=PASSIVE` help on this machine? Times a 30-step denoise + decode of the tiny test networks
at a 64^3 image in fresh processes, alternating the variable unset (libgomp's default) and PASSIVE.

Usage: python bench/omp_wait_policy.py [--runs 10]   → bench/results/omp_wait_policy.json
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
    options = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.helpers import tiny_spec_document

    spec_path = Path(tempfile.mkdtemp()) / "tiny.json"
    spec_path.write_text(json.dumps(tiny_spec_document()))
    seconds: dict[str, list[float]] = {"unset": [], "PASSIVE": []}
    for run in range(options.runs):
        for policy in seconds:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(spec_path)], capture_output=True,
                                  text=True, env=env, check=True)
            seconds[policy].append(round(json.loads(done.stdout)["seconds"], 3))
            print(run, policy, seconds[policy][-1], file=sys.stderr)
    summary = {
        policy: {"median_s": statistics.median(v), "max_s": max(v), "min_s": min(v),
                 "runs_over_2x_median_of_best": sum(x > 2 * min(min(s) for s in seconds.values()) for x in v),
                 "seconds": v}
        for policy, v in seconds.items()
    }
    results = {"what": "tiny networks, 64^3 image, 30 steps + decode, 2 torch threads", "machine":
               f"{platform.machine()}, {os.cpu_count()} cores", "runs": options.runs, "results": summary}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "omp_wait_policy.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
