"""What plugins cost `maisi --help`: wall time of a fresh `maisi --help` with the installed plugins loaded
(MAISI_LOAD_PLUGINS unset) and with none (MAISI_LOAD_PLUGINS=""), runs interleaved; plus the in-process time of
the entry-point scan that `maisi --help` does (the `maisi.commands` group) and of loading every group.

Usage: pip install ./plugins/maisi-mr; python bench/plugins_help_time.py [--runs 15] → bench/results/plugins_help_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from help_time import RESULTS, executable  # noqa: E402


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([*executable(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    return {"runs": len(seconds), "median_s": round(statistics.median(seconds), 4), "min_s": round(min(seconds), 4),
            "max_s": round(max(seconds), 4)}


def in_process_ms() -> dict:
    """Milliseconds, median of 20: the `maisi.commands` scan alone, and loading all five groups."""
    code = (
        "import time, statistics\n"
        "from importlib import metadata\n"
        "import maisi_cli.cli.app\n"
        "from maisi_cli import plugins\n"
        "scan, everything = [], []\n"
        "for _ in range(20):\n"
        "    t = time.perf_counter(); metadata.entry_points(group='maisi.commands'); scan.append(time.perf_counter() - t)\n"
        "    plugins.reset(); t = time.perf_counter(); plugins.plugin_status(); everything.append(time.perf_counter() - t)\n"
        "print(round(statistics.median(scan) * 1e3, 2), round(statistics.median(everything) * 1e3, 2))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MAISI_LOAD_PLUGINS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    scan, everything = map(float, done.stdout.split())
    return {"entry_point_scan_ms": scan, "load_all_groups_ms": everything}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    with_plugins = {k: v for k, v in os.environ.items() if k != "MAISI_LOAD_PLUGINS"}
    without = {**with_plugins, "MAISI_LOAD_PLUGINS": ""}
    installed = sorted({ep.dist.name for group in ("models", "modalities", "labels", "profiles", "commands")
                        for ep in metadata.entry_points(group=f"maisi.{group}") if ep.dist is not None})
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "python": platform.python_version(), "plugins_installed": installed, "commands": []}
    for args in (["--help"], ["models", "--help"]):
        timed(args, with_plugins)  # warm the file cache
        loaded, none = [], []
        for _ in range(options.runs):
            loaded.append(timed(args, with_plugins))
            none.append(timed(args, without))
        results["commands"].append({"args": args, "plugins_loaded": summary(loaded), "no_plugins": summary(none)})
    results["in_process"] = in_process_ms()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plugins_help_time.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
