"""Wall time of the README's quick start on this machine: `maisi generate --model demo --out DIR --preview` in a
fresh process with an empty MAISI_HOME (one 64³ pair, 30 steps, QC on), as a new user runs it.

    python bench/demo/quickstart_time.py [--runs 5]

Writes bench/demo/results/quickstart_preview.png (the first run's preview, shown in the README) and
bench/demo/results/quickstart_time.json: per run the wall seconds of the whole process (Python start-up,
imports, network loading, sampling, decode, QC, NIfTI and PNG writing) and the engine's own timings from the sidecar.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    executable = Path(sys.executable).parent / "maisi"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "maisi_cli"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "demo-out"
            env = {**os.environ, "MAISI_HOME": str(Path(folder) / "home")}
            start = time.perf_counter()
            done = subprocess.run([*command, "generate", "--model", "demo", "--out", str(out), "--preview"],
                                  capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            sidecar = json.loads((out / "sample_0000.json").read_text())
            runs.append({"wall_s": round(wall, 2), "engine": sidecar["timings"], "qc_passed": sidecar["qc"]["passed"]})
            if len(runs) == 1:  # the README shows this exact command's preview
                shutil.copy(out / "sample_0000_preview.png", RESULTS / "quickstart_preview.png")
            print(f"run {len(runs)}: {wall:.1f} s wall, QC {'pass' if sidecar['qc']['passed'] else 'FAIL'}")
    walls = [r["wall_s"] for r in runs]
    report = {"command": "maisi generate --model demo --out DIR --preview", "cpu_count": os.cpu_count(),
              "load_average_before": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "wall_s_median": statistics.median(walls), "wall_s_max": max(walls), "runs": runs}
    (RESULTS / "quickstart_time.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"median {report['wall_s_median']:.1f} s, max {report['wall_s_max']:.1f} s")


if __name__ == "__main__":
    main()
