"""bench/gpu_check.py --tiny: every part of the one-call GPU check runs on the CPU at tiny sizes and lands in the
JSON and Markdown with numbers; the time-budget guard records skipped parts instead of running them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ("environment", "fp16_flash", "rflow_ct", "ddpm_ct", "mask_generation", "trainers", "fid", "e2e_512",
         "levers", "table3", "levers_compile")


def run_script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    nice = shutil.which("nice")
    command = [*([nice, "-n", "10"] if nice else []), sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done = run_script("--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "gpu_check_tiny.json").read_text())


def engine_runs(part: dict) -> list[dict]:
    return [run for run in part.get("runs", part.get("rows", [])) if "timings_s" in run]


def test_every_part_runs_with_numbers(tiny_run):
    out, document = tiny_run
    assert document["tiny"] is True and list(document["parts"]) == list(PARTS)
    for name, part in document["parts"].items():
        assert part["status"] == "ok", (name, part["status"])
        assert part["seconds"] >= 0
    parts = document["parts"]
    assert parts["fp16_flash"]["unet_attention_blocks"] > 0 and parts["fp16_flash"]["unet_flash_attention"] == 0
    assert parts["fp16_flash"]["unet_fp32_s"] > 0 and parts["fp16_flash"]["vae_decode_finite"]
    assert parts["mask_generation"]["steps"] == 10 and parts["mask_generation"]["ms_per_step"] > 0
    assert parts["mask_generation"]["decode_s"] > 0
    for network in ("vae", "diffusion", "controlnet"):
        assert parts["trainers"]["networks"][network]["s_per_step"] > 0, network
    assert parts["fid"]["seconds"] > 0 and parts["fid"]["fid"]["average"] >= 0
    for name in ("rflow_ct", "ddpm_ct", "e2e_512", "levers", "table3", "levers_compile"):
        runs = engine_runs(parts[name])
        assert runs, name
        for run in runs:
            assert run["status"] == "ok", (name, run["status"])
            for stage in ("load", "denoise", "decode", "write", "end_to_end"):
                assert run["timings_s"][stage] is not None and run["timings_s"][stage] >= 0, (name, stage)
            assert run["predicted"]["peak_gib"] > 0 and run["decode_plan"]["windows"] >= 1


def test_each_lever_runs_against_plain_torch_with_its_record(tiny_run):
    _, document = tiny_run
    runs = {run["label"]: run for run in document["parts"]["levers"]["runs"]}
    compiled = {run["label"]: run for run in document["parts"]["levers_compile"]["runs"]}
    assert runs["plain"]["levers"] is None and compiled["plain"]["levers"] is None  # all off: no lever record
    assert runs["cudnn_benchmark"]["levers"]["notes"] == ["cudnn_benchmark: needs a CUDA GPU, ignored on cpu"]
    assert runs["channels_last"]["levers"]["on"] == ["channels_last"]
    assert compiled["compile"]["levers"]["on"] == ["compile", "compile_backend=eager"]
    assert set(compiled["compile"]["levers"]["compile_s"]) == {"unet", "controlnet"}
    assert compiled["compile"]["timings_s"]["compile"] > 0
    assert compiled["compile"]["image_difference_to_plain"]["max_hu"] == 0  # eager tracing: the same kernels
    assert compiled["cuda_graphs"]["levers"]["notes"] == ["cuda_graphs: needs a CUDA GPU, ignored on cpu"]
    assert runs["decode_overlap=0.6666"]["decode_plan"]["overlap"] == 0.6666
    assert runs["decode_plan=planner"]["decode_plan"]["rule"].startswith("24g planner")
    for label, run in [*runs.items(), *compiled.items()]:
        if label != "plain":
            assert run["speedup_vs_plain"]["end_to_end"] > 0, label


def test_refit_rows_and_markdown(tiny_run):
    out, document = tiny_run
    rows = json.loads((out / "gpu_check_tiny_refit_rows.json").read_text())
    assert rows == document["planner_refit"]["rows"] == []  # no CUDA peaks on the CPU: nothing to refit on
    assert "bench/memory_fit.py --measured" in document["planner_refit"]["command"]
    table = (out / "gpu_check_tiny.md").read_text()
    for name in PARTS:
        assert f"## {name}" in table
    assert "16g-256x256x128" in table and "80g-512x512x768" in table


def test_the_budget_guard_skips_cleanly(tmp_path):
    done = run_script("--tiny", "--budget-s", "0", "--parts", "rflow_ct,table3", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    assert list(document["parts"]) == ["rflow_ct", "table3"]
    for part in document["parts"].values():
        assert part["skipped"].startswith("time budget:") and "--parts" in part["skipped"]
    assert "skipped: time budget" in (tmp_path / "gpu_check_tiny.md").read_text()


def test_unknown_part_and_no_gpu_are_refused(tmp_path):
    done = run_script("--tiny", "--parts", "warp", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2 and "unknown part(s) warp" in done.stderr
    done = run_script("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and "--tiny" in done.stderr
