"""Does `OMP_WAIT_POLICY` matter for training on the CPU? Seconds per step of the demo recipe's three training runs
(the VAE on whole 64³ phantoms as the recipe configures it, fp32 and bf16; the diffusion UNet and the ControlNet on
the 16³×8 latents in bf16), each in a fresh process with the variable unset (libgomp's default: spin a while, then
sleep) and `PASSIVE` (sleep at once, the CLI's default), alternating. Batch 1, 2 threads.

Needs a finished demo recipe work folder (`bench/demo/recipe.py --work DIR`): its phantoms, latents and weights.

    python bench/omp_wait_policy_train.py [--work /tmp/maisi-demo-recipe4] [--runs 2]
        → bench/results/omp_wait_policy_train.json
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

# The child must not import anything that sets OMP_WAIT_POLICY before torch loads (maisi_cli.cli.app does).
CHILD = r'''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(2)
work, network, steps, out = Path(sys.argv[2]), sys.argv[3], int(sys.argv[5]), Path(sys.argv[6])
amp = sys.argv[4] == "bf16"
from bench.train_cpu_amp import step_seconds, training_run  # sets no OMP_WAIT_POLICY on import
print(json.dumps({"step_s": step_seconds(training_run(network, amp, work, out), steps)}))
'''

RUNS = {"vae fp32": ("vae", "fp32", 8), "vae bf16": ("vae", "bf16", 8),
        "diffusion bf16": ("diffusion", "bf16", 40), "controlnet bf16": ("controlnet", "bf16", 30)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/maisi-demo-recipe4"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "omp_wait_policy_train.json")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="maisi-omp-train-"))
    policies = ("unset", "PASSIVE")
    seconds: dict[str, dict[str, list[float]]] = {name: {p: [] for p in policies} for name in RUNS}
    for run in range(args.runs):
        for name, (network, precision, steps) in RUNS.items():
            for policy in policies:
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                env.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
                if policy != "unset":
                    env["OMP_WAIT_POLICY"] = policy
                out = scratch / f"{network}-{precision}-{policy}-{run}"
                done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(args.work), network, precision,
                                       str(steps), str(out)], capture_output=True, text=True, env=env, check=True)
                seconds[name][policy].append(round(json.loads(done.stdout)["step_s"], 3))
                print(run, name, policy, seconds[name][policy][-1], file=sys.stderr, flush=True)
    results = {}
    for name, by_policy in seconds.items():
        row = {f"{p}_step_s": statistics.median(v) for p, v in by_policy.items()}
        row["passive_vs_unset"] = round(row["PASSIVE_step_s"] / row["unset_step_s"], 2)
        row["runs"] = by_policy
        results[name] = row
    import torch

    report = {"what": "median seconds per training step, demo recipe's networks, batch 1, 2 threads, fresh process "
                      "per run, OMP_WAIT_POLICY unset vs PASSIVE",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "runs": args.runs, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
