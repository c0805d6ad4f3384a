"""Wall time of a shell-completion round trip and of `maisi --help`, with the installed plugins loaded
(MAISI_LOAD_PLUGINS unset) and with none (MAISI_LOAD_PLUGINS=""), runs interleaved. Goal: completion < 0.3 s.

The round trip is what a user's TAB costs: a fresh `bash --norc` sources completions/maisi.bash and calls its
completion function for `maisi gen`, which runs `maisi` with _MAISI_COMPLETE=complete_bash and reads back
`generate`. Also reports, for `maisi generate --model <TAB>`, whether the completing process imported torch or MONAI.

The wall times depend on the machine's load (recorded as load_average_1min); completion_cpu_s, the median CPU
time of the round trip's processes, hardly does.

Usage: pip install ./plugins/maisi-mr; python bench/completion_time.py [--runs 15] → bench/results/completion_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from help_time import RESULTS, executable  # noqa: E402
from plugins_help_time import summary  # noqa: E402

COMPLETIONS = Path(__file__).resolve().parents[1] / "completions"


CPU_SECONDS: dict[str, list[float]] = {}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bash_round_trip(env: dict[str, str]) -> float:
    script = (f"source {COMPLETIONS / 'maisi.bash'}; COMP_WORDS=(maisi gen); COMP_CWORD=1; _maisi_completion maisi; "
              "printf '%s\\n' \"${COMPREPLY[@]}\"")
    path_env = {**env, "PATH": f"{Path(executable()[0]).parent}{os.pathsep}{env.get('PATH', '')}"}
    cpu, start = children_cpu(), time.perf_counter()
    done = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, env=path_env, check=True)
    seconds = time.perf_counter() - start
    CPU_SECONDS.setdefault("plugins" if "MAISI_LOAD_PLUGINS" not in env else "none", []).append(children_cpu() - cpu)
    assert done.stdout.split() == ["generate"], done.stdout
    return seconds


def help_time(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([*executable(), "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=env)
    return time.perf_counter() - start


def heavy_imports(env: dict[str, str]) -> list[str]:
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted({'torch', 'monai'} & set(sys.modules))))\n"
            "from maisi_cli.cli.app import app\napp(prog_name='maisi')\n")
    request = {**env, "_MAISI_COMPLETE": "complete_bash", "COMP_WORDS": "maisi generate --model ", "COMP_CWORD": "3"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=request, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    with_plugins = {k: v for k, v in os.environ.items() if k != "MAISI_LOAD_PLUGINS"}
    without = {**with_plugins, "MAISI_LOAD_PLUGINS": ""}
    installed = sorted({ep.dist.name for group in ("models", "modalities", "labels", "profiles", "commands")
                        for ep in metadata.entry_points(group=f"maisi.{group}") if ep.dist is not None})
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "python": platform.python_version(), "plugins_installed": installed, "goal_s": 0.3, "commands": []}
    for name, measure in (("bash completion round trip: maisi gen<TAB>", bash_round_trip),
                          ("maisi --help", help_time)):
        measure(with_plugins)  # warm the file cache
        loaded, none = [], []
        for _ in range(options.runs):
            loaded.append(measure(with_plugins))
            none.append(measure(without))
        results["commands"].append({"what": name, "plugins_loaded": summary(loaded), "no_plugins": summary(none)})
    # CPU time (user + system) of the round trip's processes: what the wall time is on an idle machine, about
    results["completion_cpu_s"] = {key: round(statistics.median(values[1:] or values), 4)
                                   for key, values in CPU_SECONDS.items()}
    results["load_average_1min"] = round(os.getloadavg()[0], 2)
    results["completion_imports_torch_or_monai"] = heavy_imports(with_plugins)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "completion_time.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
