"""bench/gpu_table3.py --tiny: the GPU Table 3 benchmark's code path on the CPU (tiny spec, 32³), as a smoke test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_table3.py"


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    nice = shutil.which("nice")
    command = [*([nice, "-n", "10"] if nice else []), sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def test_tiny_run_writes_the_table(tmp_path):
    done = run_script("--tiny", "--rows", "16g-256x256x128,80g-512x512x768", "--out", str(tmp_path),
                      "--backends", "torch,trt")
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "gpu_table3_tiny.json").read_text())
    assert document["tiny"] is True and document["steps"] == 2
    assert [row["id"] for row in document["rows"]] == ["16g-256x256x128", "80g-512x512x768"]
    for row in document["rows"]:
        assert row["published"]["peak_gib"] > 0 and row["published"]["time_rflow_ddpm"]
        assert row["predicted_peak_gib"] > 0
        assert row["size_run"] == [32, 32, 32]
        torch_run, trt_run = row["results"]
        assert torch_run["backend"] == "torch" and torch_run["status"] == "ok", torch_run["status"]
        assert torch_run["precision"] == "fp32"
        timings = torch_run["timings_s"]
        for stage in ("load", "denoise", "decode", "write", "end_to_end", "generate"):
            assert timings[stage] is not None and timings[stage] >= 0, stage
        assert timings["generate"] <= timings["end_to_end"]
        assert torch_run["peak_memory_gib"] is None  # no CUDA statistics on the CPU
        assert torch_run["decode_plan"]["mode"] in ("whole", "sliding")
        assert torch_run["predicted"]["peak_gib"] > 0
        assert trt_run["backend"] == "trt"
        assert "skipped" in trt_run or "status" in trt_run
    table = (tmp_path / "gpu_table3_tiny.md").read_text()
    assert "16g-256x256x128" in table and "80g-512x512x768" in table


def test_without_a_gpu_it_explains(tmp_path):
    done = run_script("--out", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "no CUDA GPU" in done.stderr and "--tiny" in done.stderr
    assert not (tmp_path / "gpu_table3.json").exists()


def test_unknown_row_is_refused(tmp_path):
    done = run_script("--tiny", "--rows", "99g-1x1x1", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "unknown row" in done.stderr
