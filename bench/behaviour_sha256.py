"""The sha256 of what `maisi generate` writes for two fixed runs, so an engine change can show its output is unchanged.

1. the README's quick start: `maisi generate --model demo --out OUT --preview` (the packaged demo model);
2. the full-size rflow-ct networks (random weights from tests.helpers.write_released_weights, seed 1, released
   layout) on the phantom mask at 64³ and 1.5 mm, seed 0, the model's 30 steps, no QC.

Each run is a fresh `maisi` process on the CPU. The image, label and preview files are hashed (the sidecars hold
timings and a date), a .nii.gz file by its decompressed content (since session 14: the gzip writer may change).
`--check` compares with `results/behaviour_sha256.json` and exits 1 on a difference;
without it the file is written. tests/integration/test_demo_model.py checks the quick-start hashes on every CI run;
the full-size case (about a minute) is run by hand before and after an engine change.

    python bench/behaviour_sha256.py [--check] [--only demo|full-size]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "behaviour_sha256.json"
sys.path.insert(0, str(REPO))


def maisi(*args: str, env: dict[str, str]) -> None:
    executable = Path(sys.executable).parent / "maisi"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "maisi_cli"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"maisi {' '.join(args)} failed:\n{done.stderr}")


def content_sha256(path: Path) -> str:
    """sha256 of a file's content: a .gz file's after decompressing it (the compressed bytes depend on the deflate
    library and its version, io/nifti.gzip_bytes; the voxels and header do not), any other file's as it is."""
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if path.suffix == ".gz" else data).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: content_sha256(p) for p in sorted(folder.iterdir()) if p.suffix in (".gz", ".png")}


def demo_case(work: Path) -> dict[str, str]:
    out = work / "demo-out"
    maisi("generate", "--model", "demo", "--out", str(out), "--preview",
          env={"MAISI_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "MAISI_WEIGHTS_DIR": ""})
    return hashes(out)


def full_size_case(work: Path) -> dict[str, str]:
    from maisi_cli.models import get_model
    from tests.helpers import write_mask, write_released_weights

    weights = work / "weights"
    write_released_weights(get_model("rflow-ct"), weights, seed=1)
    mask = write_mask(work / "mask.nii.gz", (64, 64, 64), (1.5, 1.5, 1.5))
    out = work / "full-size-out"
    maisi("generate", "--model", "rflow-ct", "--size", "64x64x64", "--spacing", "1.5", "--allow-any-size",
          "--mask", str(mask), "--seed", "0", "--no-qc", "--device", "cpu", "--precision", "fp32", "--out", str(out),
          env={"MAISI_WEIGHTS_DIR": str(weights), "MAISI_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"})
    return hashes(out)


CASES = {"demo": demo_case, "full-size": full_size_case}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the recorded hashes")
    parser.add_argument("--only", choices=sorted(CASES))
    args = parser.parse_args()
    recorded = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    results = {}
    for name, case in CASES.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory() as work:
            results[name] = case(Path(work))
        print(name, json.dumps(results[name], indent=2))
    if args.check:
        differing = [name for name in results if recorded.get(name) != results[name]]
        print("differs: " + ", ".join(differing) if differing else "unchanged")
        return 1 if differing else 0
    RESULT.write_text(json.dumps({**recorded, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
