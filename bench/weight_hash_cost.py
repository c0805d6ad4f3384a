"""What hashing the bytes that are loaded costs, at the released checkpoint sizes (issue 20, "what is loaded is what
was checked").

The networks of the released rflow-ct definitions are built with MONAI's random initialisation and saved in the
released layouts (engine/weights.save_released_checkpoint) into a work folder; each file is then loaded into a
fresh network of its kind, alternating the two paths, `--repeats` times:

  old  sha256 of the file (engine/weights.hash_file, a first read), then torch.load(path, mmap=True) (a second read
       that maps whatever the file holds by then), then load_state_dict;
  new  engine/weights.load_verified as the engine runs it: one read into memory, hashed block by block as it
       arrives, the lock check, torch.load(weights_only=True) of those same bytes, the key check, load_state_dict.

The new path's hash is timed apart by reading the file the same way without hashing (`read only`), so
hash = read_hashed − read only. Load time = the path's time from file to loaded network, excluding the network's
construction (timed too, as `build`, which the engine pays either way). Every file is read once before timing: the
page cache is warm, as on a machine that loads the same weights again (a cold read adds the disk's time to both
paths alike). Peak memory: the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over
its RSS before each load.

Usage: python bench/weight_hash_cost.py [--work DIR] [--repeats 3] [--components all|c1,c2]
       → bench/results/weight_hash_cost.json + a README section
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
sys.path.insert(0, str(ROOT))
SECTION = "## What hashing the loaded bytes costs (`weight_hash_cost.py`)"


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def read_only(path: Path) -> io.BytesIO:
    """engine/weights.read_hashed without the hash: the reference for the hash's own time."""
    from maisi_cli.engine.weights import READ_BLOCK

    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = io.BytesIO()
        buffer.seek(size - 1)
        buffer.write(b"\0")
        with buffer.getbuffer() as storage:
            filled = 0
            while filled < size:
                filled += handle.readinto(storage[filled:filled + READ_BLOCK])
    buffer.seek(0)
    return buffer


def old_path(network, path: Path, key: str | None) -> dict[str, float]:
    import torch

    from maisi_cli.engine.store import hash_file

    start = time.perf_counter()
    hash_file(path)
    hashed = time.perf_counter()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    network.load_state_dict(checkpoint[key] if key else checkpoint, strict=True)
    done = time.perf_counter()
    return {"hash_s": hashed - start, "load_s": done - start}


def new_path(network, weight, spec) -> dict[str, float]:
    from maisi_cli.engine.weights import load_verified

    start = time.perf_counter()
    load_verified(network, weight, spec)
    return {"load_s": time.perf_counter() - start}


def engine_load(spec, component: str, weight, hashed: bool) -> float:
    """Seconds from nothing to a loaded network as engine/loading.load_networks does it: the file read (and, with
    `hashed`, hashed: engine/weights.built_and_read) in a second thread while the network is built, then loaded from
    those bytes. Without `hashed` the same steps skip the hash: the difference is what the hash still costs."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.weights import STATE_DICT_KEYS, built_and_read, load_verified

    started = time.perf_counter()
    if hashed:
        network, read = built_and_read(lambda: build_network(spec, component), weight)
        load_verified(network, weight, spec, read)
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            reading = pool.submit(read_only, weight.path)
            network = build_network(spec, component)
            data = reading.result()
        checkpoint = torch.load(data, map_location="cpu", weights_only=True)
        key = STATE_DICT_KEYS.get(component)
        network.load_state_dict(checkpoint[key] if key else checkpoint, strict=True)
    return time.perf_counter() - started


def measure_file(spec, component: str, path: Path, repeats: int) -> dict:
    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.weights import STATE_DICT_KEYS, WeightFile, read_hashed

    weight = WeightFile(component, spec.weights[component], path, "weights-dir")
    key = STATE_DICT_KEYS.get(component)
    path.read_bytes()  # warm the page cache
    runs: dict[str, list] = {"old": [], "new": [], "read_only_s": [], "read_hashed_s": [], "build_s": [],
                             "engine_s": [], "engine_no_hash_s": []}
    peaks: dict[str, list] = {"old": [], "new": []}
    for repeat in range(repeats):
        order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
        for which in order:
            started = time.perf_counter()
            network = build_network(spec, component)
            runs["build_s"].append(time.perf_counter() - started)
            gc.collect()  # the last run's network and tensors go now, not in the middle of this one's peak
            before = rss_kib("VmRSS")
            tracked = reset_peak()
            runs[which].append(old_path(network, path, key) if which == "old" else new_path(network, weight, spec))
            if tracked:
                peaks[which].append((rss_kib("VmHWM") - before) / 1024)
            del network
        for hashed in ((True, False) if repeat % 2 == 0 else (False, True)):
            gc.collect()
            runs["engine_s" if hashed else "engine_no_hash_s"].append(engine_load(spec, component, weight, hashed))
        started = time.perf_counter()
        data = read_only(path)
        runs["read_only_s"].append(time.perf_counter() - started)
        del data
        started = time.perf_counter()
        data, _ = read_hashed(path)
        runs["read_hashed_s"].append(time.perf_counter() - started)
        del data
    median = statistics.median
    new_load = median(r["load_s"] for r in runs["new"])
    old_load = median(r["load_s"] for r in runs["old"])
    hash_new = max(0.0, median(runs["read_hashed_s"]) - median(runs["read_only_s"]))
    build = median(runs["build_s"])
    engine, engine_no_hash = median(runs["engine_s"]), median(runs["engine_no_hash_s"])
    size = path.stat().st_size
    return {
        "component": component, "file": spec.weights[component], "bytes": size,
        "old_load_s": round(old_load, 3), "old_hash_s": round(median(r["hash_s"] for r in runs["old"]), 3),
        "new_load_s": round(new_load, 3),
        "new_read_only_s": round(median(runs["read_only_s"]), 3),
        "new_read_hashed_s": round(median(runs["read_hashed_s"]), 3),
        "new_hash_s": round(hash_new, 3),
        "hash_share_of_new_load": round(hash_new / new_load, 3),
        "hash_share_with_build": round(hash_new / (new_load + build), 3),
        "build_s": round(build, 3),
        "engine_load_s": round(engine, 3), "engine_load_no_hash_s": round(engine_no_hash, 3),
        "engine_hash_s": round(max(0.0, engine - engine_no_hash), 3),
        "engine_hash_share": round(max(0.0, engine - engine_no_hash) / engine, 3),
        "sha256_gb_per_s": round(size / 1e9 / hash_new, 2) if hash_new else None,
        "peak_rss_rise_mb": {k: round(median(v), 0) for k, v in peaks.items() if v},
        "runs": {k: [round(x, 3) if isinstance(x, float) else {n: round(t, 3) for n, t in x.items()} for x in v]
                 for k, v in runs.items()},
    }


def write_checkpoints(spec, components: list[str], work: Path) -> dict[str, Path]:
    import torch

    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.weights import save_released_checkpoint

    paths = {}
    for i, component in enumerate(components):
        path = work / spec.weights[component]
        if not path.is_file():
            torch.manual_seed(i)
            network = build_network(spec, component)  # MONAI's own random initialisation
            save_released_checkpoint(network, component, path,
                                     scale_factor=1.0 if "diffusion" in component else None)
            del network
        paths[component] = path
    return paths


def update_readme(result: dict) -> None:
    rows = ["| file | MB | old: hash + mmap load (s) | new: load_verified (s) | hash in new (s) | hash share of "
            "load | engine: build ∥ read+hash, load (s) | same, no hash (s) | hash share in the engine | "
            "peak RSS rise old / new (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["files"]:
        peak = r["peak_rss_rise_mb"]
        rows.append(f"| `{r['file']}` | {r['bytes'] / 1e6:.0f} | {r['old_load_s']:.2f} (hash {r['old_hash_s']:.2f}) "
                    f"| {r['new_load_s']:.2f} | {r['new_hash_s']:.2f} | {100 * r['hash_share_of_new_load']:.0f} % | "
                    f"{r['engine_load_s']:.2f} | {r['engine_load_no_hash_s']:.2f} | "
                    f"{100 * r['engine_hash_share']:.0f} % | {peak.get('old', '?'):.0f} / "
                    f"{peak.get('new', '?'):.0f} |")
    total = result["total"]
    text = "\n".join([
        SECTION, "",
        f"Measured {result['date']} on {result['machine']}, page cache warm, median of {result['repeats']} "
        "alternating runs per file; random-weight checkpoints of the released rflow-ct networks in the released "
        "layouts (`results/weight_hash_cost.json`). Old: sha256 of the file, then `torch.load(mmap=True)` of a "
        "second read. New (`engine/weights.load_verified`): one read, hashed as it arrives, the same bytes "
        "`torch.load`ed. Hash = read with hashing − the same read without. Load = file to loaded network; build "
        "(MONAI's constructor, paid either way) is apart. Engine: what `load_networks` runs, from nothing to a "
        "loaded network — the file read and hashed in a second thread (`built_and_read`; hashlib releases the GIL) "
        "while MONAI builds the network, then loaded from those bytes — against the same steps without the hash.",
        "",
        *rows, "",
        f"Load average {result['load_average']['before']:.1f} before and {result['load_average']['after']:.1f} "
        "after the run; single runs vary (`runs` in the JSON: up to 1.5× for the engine rows), and the medians "
        "alternate each pair of paths under the same load, so an engine difference of a few hundredths of a second "
        "is within that noise.", "",
        f"All files: old {total['old_load_s']:.1f} s, new {total['new_load_s']:.1f} s; the hash alone "
        f"{total['new_hash_s']:.1f} s = {100 * total['hash_share_of_new_load']:.0f} % of a load from memory. "
        + result["verdict"],
        "",
        "The new path also costs more than the old one in all: the old `torch.load(mmap=True)` mapped the file and "
        "`load_state_dict` copied from the page cache once, while the new one copies the file into memory, "
        "`torch.load` copies those bytes into tensors, and `load_state_dict` copies again; and it holds the file's "
        "bytes and its tensors together (the peak RSS rise: about twice the file for the large ones, less for small "
        "ones that fit in memory the allocator had kept), one file at a time. That is the "
        "price of loading exactly the bytes that were hashed: a mapping reads the file again, whatever it holds by "
        "then. The old path's hash was slower than the new one's because it read the file a first time for it.",
        "",
    ])
    readme = HERE / "README.md"
    content = readme.read_text()
    if SECTION in content:
        start = content.index(SECTION)
        end = content.find("\n## ", start + len(SECTION))
        content = content[:start] + text + (content[end + 1:] if end != -1 else "")
    else:
        content = content.rstrip("\n") + "\n\n" + text
    readme.write_text(content)


def engine_verdict(total: dict, speed: float) -> str:
    """What the hash costs as the engine loads: the difference of the summed medians, and the sum of each file's
    positive difference, an upper bound that counts a file's noise against the hash but never for it."""
    difference = total["engine_load_s"] - total["engine_load_no_hash_s"]
    share, bound = difference / total["engine_load_s"], total["engine_hash_share"]
    if bound < 0.05:
        goal = "The issue's goal (< 5 %) is met by both."
    elif share < 0.05:
        goal = ("The issue's goal (< 5 %) is met by the difference, not by that bound, on these 2 cores: sha256 runs "
                f"at about {speed:.1f} GB/s and MONAI's construction keeps both cores busy, so the overlap is partial "
                "(more cores should hide it behind the construction: not measured, no GPU machine was lent).")
    else:
        goal = f"The issue's goal (< 5 %) is not met on these 2 cores (sha256 at about {speed:.1f} GB/s)."
    return (f"As the engine loads (the hash in a second thread while the network is built), all files take "
            f"{total['engine_load_s']:.1f} s with the hash and {total['engine_load_no_hash_s']:.1f} s without: "
            f"**{100 * share:+.1f} % of load time**; counting only each file's positive difference, at most "
            f"{total['engine_hash_s']:.2f} s = **{100 * bound:.1f} %**. " + goal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--components", default="all")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README section from the JSON")
    args = parser.parse_args()
    if args.readme_only:
        result = json.loads((HERE / "results" / "weight_hash_cost.json").read_text())
        speed = statistics.median(f["sha256_gb_per_s"] for f in result["files"] if f["sha256_gb_per_s"])
        result["verdict"] = engine_verdict(result["total"], speed)
        (HERE / "results" / "weight_hash_cost.json").write_text(json.dumps(result, indent=2) + "\n")
        update_readme(result)
        return

    import torch

    from maisi_cli.models import get_model

    spec = get_model("rflow-ct")
    components = [c for c in spec.weights if f"{c}_def" in spec.network]
    if args.components != "all":
        components = args.components.split(",")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="weight-hash-cost-") as temporary:
        work = args.work or Path(temporary)
        paths = write_checkpoints(spec, components, work)
        files = [measure_file(spec, c, paths[c], args.repeats) for c in components]
    total = {key: round(sum(f[key] for f in files), 3)
             for key in ("old_load_s", "new_load_s", "new_hash_s", "build_s", "old_hash_s", "engine_load_s",
                         "engine_load_no_hash_s", "engine_hash_s")}
    total["engine_hash_share"] = round(total["engine_hash_s"] / total["engine_load_s"], 3)
    total["hash_share_of_new_load"] = round(total["new_hash_s"] / total["new_load_s"], 3)
    total["hash_share_with_build"] = round(total["new_hash_s"] / (total["new_load_s"] + total["build_s"]), 3)
    speed = statistics.median(f["sha256_gb_per_s"] for f in files if f["sha256_gb_per_s"])
    verdict = engine_verdict(total, speed)
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, hashlib {hashlib.sha256().name} (OpenSSL)",
        "repeats": args.repeats, "files": files, "total": total, "verdict": verdict,
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = HERE / "results" / "weight_hash_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_readme:
        update_readme(result)
    print(json.dumps({"total": total, "verdict": verdict}, indent=2))


if __name__ == "__main__":
    main()
