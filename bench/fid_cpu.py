"""`maisi fid` on the CPU: seconds per volume at 128³ and 256³, and peak memory as `--batch-size` grows.

The extractor is the full RadImageNet ResNet-50 architecture (2048 features) with **random weights**: the timing and
memory do not depend on the weight values, and the published checkpoint is not needed. Volumes are random CT-like
noise (HU), already at the target shape with 1 mm spacing (so padding/cropping are no-ops; no resampling).

- time: per volume, what `maisi fid` does for one file with no cache: read the NIfTI, RAS, pad/crop, clip, then the
  three planes (SIZE slices each of SIZE×SIZE) through the network in batches of 32 (the default); one process per
  size, the first volume is a warm-up when more than one is measured.
- memory: one process per `--batch-size` (8, 32, 128), one 128³ volume, the XY plane; peak RSS is the process's
  `ru_maxrss` (model, volume, slice stack and the activations of one batch), RSS after loading the model is
  `VmRSS` before the first forward.

Run: `python bench/fid_cpu.py [--out bench/results/fid_cpu.json] [--sizes 128 256] [--volumes 2 1]
[--batch-sizes 8 32 128]` (a virtual environment with maisi installed; writes ~94 MB of random weights to a temp
folder). Takes about 5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_volume(path: Path, size: int, seed: int) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    data = rng.normal(-200, 400, size=(size, size, size)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process; prints one JSON line."""
    import torch

    from maisi_cli.engine.fid import FeatureStats, FidSettings, load_extractor, volume_features

    extractor = load_extractor(Path(args.weights))
    after_load = rss_mb()
    planes = tuple(args.planes.split(","))
    settings = FidSettings(planes=planes, target_shape=(args.size,) * 3, batch_size=args.batch_size)
    times = []
    for path in args.files:
        start = time.perf_counter()
        features = volume_features(Path(path), extractor, settings, None, FeatureStats())
        times.append(time.perf_counter() - start)
    assert all(f.shape == (args.size, 2048) for f in features.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"seconds": times, "rss_after_load_mb": round(after_load, 1), "peak_rss_mb": round(peak, 1),
                      "threads": torch.get_num_threads()}))


def run_child(weights: Path, files: list[Path], size: int, batch_size: int, planes: str) -> dict:
    command = [sys.executable, __file__, "--child", "--weights", str(weights), "--size", str(size),
               "--batch-size", str(batch_size), "--planes", planes, "--files", *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fid_cpu.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--volumes", type=int, nargs="+", default=[2, 1], help="volumes timed per size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--planes", default="xy,yz,zx", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from maisi_cli.engine.fid import RadImageNetResNet50

    started = time.perf_counter()
    load_before = os.getloadavg()
    results: dict = {"per_volume": {}, "memory_by_batch_size": {}}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        weights = root / "RadImageNet-ResNet50_notop.pth"
        torch.manual_seed(0)
        torch.save(RadImageNetResNet50().state_dict(), weights)
        for size, count in zip(args.sizes, args.volumes + [args.volumes[-1]] * len(args.sizes)):
            files = [root / f"v{size}_{i}.nii.gz" for i in range(count)]
            for i, path in enumerate(files):
                write_volume(path, size, i)
            measured = run_child(weights, files, size, 32, "xy,yz,zx")
            timed = measured["seconds"][1:] if count > 1 else measured["seconds"]
            results["per_volume"][f"{size}^3"] = {
                "seconds_per_volume": round(sum(timed) / len(timed), 2),
                "seconds_each": [round(s, 2) for s in measured["seconds"]],
                "warm_up_dropped": count > 1, "slices_per_volume": 3 * size, "batch_size": 32,
                "peak_rss_mb": measured["peak_rss_mb"]}
            print(f"{size}^3: {results['per_volume'][f'{size}^3']}", flush=True)
        memory_volume = root / "mem128.nii.gz"
        write_volume(memory_volume, 128, 7)
        for batch_size in args.batch_sizes:
            measured = run_child(weights, [memory_volume], 128, batch_size, "xy")
            results["memory_by_batch_size"][str(batch_size)] = {
                "peak_rss_mb": measured["peak_rss_mb"], "rss_after_load_mb": measured["rss_after_load_mb"],
                "seconds_xy_plane": round(measured["seconds"][0], 2)}
            print(f"batch {batch_size}: {results['memory_by_batch_size'][str(batch_size)]}", flush=True)
        threads = measured["threads"]
    document = {
        "what": "maisi fid feature extraction on the CPU, full RadImageNet ResNet-50 architecture with random "
                "weights (timing and memory do not depend on the weights), fp32, no cache; per volume = read + "
                "RAS + pad/crop + 3 planes x SIZE slices of SIZExSIZE, batch 32; memory = one 128^3 volume, XY "
                "plane (128 slices of 128x128), one process per batch size, peak RSS = ru_maxrss",
        "torch": torch.__version__, "threads": threads, "cpus": os.cpu_count(), "machine": platform.machine(),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after":
            [round(x, 2) for x in os.getloadavg()], "bench_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
