"""Wall time of `maisi --help` (and `maisi generate --help`) in a fresh process. Goal: < 0.5 s.

Usage: python bench/help_time.py [--runs 15]   → bench/results/help_time.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def executable() -> list[str]:
    beside = Path(sys.executable).parent / "maisi"
    return [str(beside)] if beside.exists() else [shutil.which("maisi") or "maisi"]


def time_command(args: list[str], runs: int) -> dict:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*executable(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        seconds.append(time.perf_counter() - start)
    return {"args": args, "runs": runs, "median_s": round(statistics.median(seconds), 4),
            "min_s": round(min(seconds), 4), "max_s": round(max(seconds), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    time_command(["--help"], 2)  # warm the file cache
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "python": platform.python_version(),
        "goal_s": 0.5,
        "commands": [time_command(args, options.runs) for args in (["--help"], ["generate", "--help"], ["profiles", "list"])],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "help_time.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
