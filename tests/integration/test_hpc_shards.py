"""Issue 8 (HPC batch): three shards of a 6-sample job, one of them a real process killed mid-sample and re-run,
give files byte-identical to one unsharded run.

Shard 0/3 takes its shard from SLURM_ARRAY_TASK_ID/COUNT, shard 1/3 from `--shard` (which beats the SLURM
variables set beside it), shard 2/3 from the SLURM variables of a real `maisi generate` process. That process is
SIGKILLed in the middle of its second sample (2 and 5 are its own): sample 5's image is written, its label and
sidecar are not. To kill it at that point every time, rather than whenever a poll happens to catch it, the process
runs the CLI with `write_atomic` (io/files.py) wrapped to stop (sleep) after writing sample 5's image; it is otherwise the normal
`maisi` entry point. While it sleeps it holds sample 5's lock, and a second job on the same shard leaves sample 5
to it ("locked"). After the kill the re-run writes sample 5 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from maisi_cli.cli.app import app

# `python -c HOOK generate ...`: the maisi CLI, stopping for good once it has written the named file.
HOOK = """
import os, sys, time
import maisi_cli.io.files as files
_write = files.write_atomic
def write_atomic(path, payload):
    digest = _write(path, payload)
    if path.name == os.environ["MAISI_TEST_STOP_AFTER"]:
        open(os.environ["MAISI_TEST_STOPPED"], "w").close()
        time.sleep(300)
    return digest
files.write_atomic = write_atomic  # before the writers import it
from maisi_cli.cli.app import main
sys.argv[0] = "maisi"
main()
"""

SAMPLES = 6


def job_args(tiny_model: tuple[Path, Path], mask: Path, out: Path) -> list[str]:
    spec, weights = tiny_model
    return ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask), "--out", str(out),
            "-n", str(SAMPLES), "--seed", "21", "--steps", "2", "--no-qc"]


def run_json(args: list[str], env: dict[str, str] | None = None) -> dict:
    result = CliRunner().invoke(app, ["--json", *args], env=env)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def sidecar(path: Path) -> dict:
    document = json.loads(path.read_text())
    document.pop("created")
    document.pop("timings")
    return document


def test_three_shards_one_killed_and_rerun_equal_one_run(tiny_model, mask_file, tmp_path, monkeypatch):
    whole, sharded = tmp_path / "A", tmp_path / "B"
    sharded.mkdir()
    stopped = tmp_path / "stopped"
    log = (tmp_path / "killed-shard.log").open("w")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3",
           "MAISI_TEST_STOP_AFTER": "sample_0005_image.nii.gz", "MAISI_TEST_STOPPED": str(stopped)}
    # Started first: it imports torch while the in-process runs below work.
    process = subprocess.Popen([sys.executable, "-c", HOOK, *job_args(tiny_model, mask_file, sharded)], env=env,
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        # (1) one unsharded run
        assert run_json(job_args(tiny_model, mask_file, whole))["written"] == list(range(SAMPLES))
        # (2) shard 0/3 from the SLURM variables; shard 1/3 from --shard, which beats them
        slurm = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}
        report = run_json(job_args(tiny_model, mask_file, sharded), env=slurm)
        assert report["written"] == [0, 3] and report["plan"]["shard"] == "0/3"
        report = run_json([*job_args(tiny_model, mask_file, sharded), "--shard", "1/3"], env=slurm)
        assert report["written"] == [1, 4] and report["plan"]["shard"] == "1/3"

        # (3) shard 2/3 as a real process, stopped after sample 5's image: alive, holding sample 5's lock
        deadline = time.monotonic() + 120
        while not stopped.exists():
            assert process.poll() is None, (tmp_path / "killed-shard.log").read_text()
            assert time.monotonic() < deadline, "the shard process never reached sample 5"
            time.sleep(0.05)
        assert (sharded / "sample_0002.json").is_file()  # its first sample is complete
        assert (sharded / "sample_0005_image.nii.gz").is_file()
        assert not (sharded / "sample_0005_label.nii.gz").exists() and not (sharded / "sample_0005.json").exists()

        # a second job on the same shard meanwhile: sample 5 is left to the live holder, never written twice
        report = run_json([*job_args(tiny_model, mask_file, sharded), "--shard", "2/3"])
        assert report["written"] == [] and report["skipped"] == [2] and report["locked"] == [5]
        assert not (sharded / "sample_0005.json").exists()
    finally:
        process.send_signal(signal.SIGKILL)  # killed mid-sample
        process.wait(30)
        log.close()
    assert process.returncode == -signal.SIGKILL
    assert (sharded / ".sample_0005.lock").exists()  # stale: a dead process holds no flock

    # (4) the re-run of shard 2/3 (its SLURM variables again) finishes the missing sample only
    before = {p.name: p.stat().st_mtime_ns for p in sharded.iterdir() if not p.name.startswith(".")
              and not p.name.startswith("sample_0005")}
    report = run_json(job_args(tiny_model, mask_file, sharded),
                      env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert report["written"] == [5] and report["skipped"] == [2] and report["locked"] == report["failed"] == []
    assert report["timings"]["total_s"] > 0 and report["samples"][1]["timings"]["denoise_s"] > 0
    assert {name: (sharded / name).stat().st_mtime_ns for name in before} == before

    # B equals A: images and labels byte for byte, sidecars but for their creation time and timings
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in whole.iterdir())  # no lock, no temp
    for k in range(SAMPLES):
        for suffix in ("_image.nii.gz", "_label.nii.gz"):
            name = f"sample_{k:04d}{suffix}"
            assert (whole / name).read_bytes() == (sharded / name).read_bytes(), name
        assert sidecar(whole / f"sample_{k:04d}.json") == sidecar(sharded / f"sample_{k:04d}.json"), k
