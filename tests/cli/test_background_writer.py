"""`maisi generate -n N` writes each sample on a background thread while it makes the next (engine/run.py
SampleWriter): the overlap happens, a failed write stops the run with nothing reported that is not on disk, the files
equal those of a sample written on its own, and every stage is in the sidecar's timings."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import maisi_cli
import maisi_cli.engine.run as run_module
from maisi_cli.engine.progress import ProgressEvent
from maisi_cli.engine.qc import QCOptions
from maisi_cli.errors import NoSpaceError
from tests.cli.test_errors import assert_one_line_error
from tests.cli.test_output_folder import generate
from tests.helpers import full_disk_when_writing


def planned(tiny_model, mask_file: Path, out: Path, samples: int):
    spec, weights = tiny_model
    generator = maisi_cli.Generator(model=str(spec), weights_dir=weights)
    request = generator.request(mask=mask_file, out=out, num_samples=samples, steps=2, seed=3)
    return generator, generator.plan_run(request, QCOptions(enabled=False))


def test_a_sample_is_written_while_the_next_one_is_denoised(tiny_model, mask_file, tmp_path, monkeypatch):
    """Sample 0's write waits until sample 1 has taken a denoising step: it can only end if the two overlap (a
    sequential run would make sample 1 only after the write). Its "write" event and on_written come after its files
    and sidecar are on disk, on the caller's thread, and before sample 1's."""
    real_write = run_module.write_sample
    next_denoising = threading.Event()
    log: list[tuple] = []
    writer_threads: set[str] = set()

    def slow_write(plan, loaded, task, sample, run_digest, started):
        writer_threads.add(threading.current_thread().name)
        log.append(("write start", task.index))
        if task.index == 0:
            log.append(("overlapped", next_denoising.wait(timeout=20)))
        timings = real_write(plan, loaded, task, sample, run_digest, started)
        log.append(("write end", task.index))
        return timings

    def on_progress(event: ProgressEvent) -> None:
        assert threading.current_thread() is threading.main_thread()
        if event.stage == "denoise" and event.sample == 1:
            next_denoising.set()
        if event.stage in ("denoise", "write"):
            log.append((event.stage, event.sample))

    def on_written(task) -> None:
        assert threading.current_thread() is threading.main_thread()
        assert task.image.is_file() and task.label.is_file() and task.sidecar.is_file()
        log.append(("on_written", task.index))

    monkeypatch.setattr(run_module, "write_sample", slow_write)
    generator, plan = planned(tiny_model, mask_file, tmp_path / "out", 2)
    report = generator.run(plan, on_progress, on_written=on_written)
    assert report.indices("written") == [0, 1]
    assert ("overlapped", True) in log, log
    assert threading.main_thread().name not in writer_threads
    start0, end0 = log.index(("write start", 0)), log.index(("write end", 0))
    assert ("denoise", 1) in log[start0:end0]  # sample 1 denoised while sample 0 was being written
    assert end0 < log.index(("write", 0)) < log.index(("on_written", 0)) < log.index(("write", 1))


def test_files_equal_those_of_each_sample_written_on_its_own(tiny_model, mask_file, tmp_path):
    """Background-written files are byte for byte those Sample.save writes (the same writer, no overlap), and each
    sidecar's timings hold every stage, adding up to total_s."""
    generator, plan = planned(tiny_model, mask_file, tmp_path / "run", 3)
    report = generator.run(plan)
    assert report.indices("written") == [0, 1, 2]
    samples = generator.generate(mask=mask_file, num_samples=3, steps=2, seed=3, qc=False)
    for sample in samples:
        sample.save(tmp_path / "saved")
    for name in sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".nii.gz")):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes(), name
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith((".lock", ".partial"))]
    stages = ("mask_s", "condition_s", "denoise_s", "decode_s", "postprocess_s", "qc_s", "write_s", "sidecar_s")
    for index, result in enumerate(report.samples):
        timings = json.loads((tmp_path / "run" / f"sample_{index:04d}.json").read_text())["timings"]
        assert list(timings) == [*stages, "other_s", "total_s"]
        assert result.timings == timings
        assert abs(sum(timings[k] for k in (*stages, "other_s")) - timings["total_s"]) < 0.006
        assert 0 <= timings["other_s"] < 0.1 and timings["denoise_s"] > 0 and timings["write_s"] > 0


def test_a_failed_background_write_stops_the_run_and_reports_nothing_unwritten(tiny_model, mask_file, tmp_path,
                                                                                monkeypatch):
    """Sample 1's image hits a full disk while sample 2 is made: one line, exit 1, the samples complete (0) named;
    nothing of samples 1 and 2 is left, no lock or temporary file."""
    full_disk_when_writing(monkeypatch, "sample_0001_image.nii.gz")
    out = tmp_path / "out"
    result = generate(tiny_model, mask_file, out, "-n", "3")
    assert_one_line_error(result, 1, f"no space left writing {out / 'sample_0001_image.nii.gz'}",
                          "1 sample(s) complete", "free space and re-run")
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith("sample_")] == ["sample_0000.json", "sample_0000_image.nii.gz",
                                                             "sample_0000_label.nii.gz"], names
    assert not [n for n in names if n.endswith((".partial", ".lock"))], names


def test_a_failed_write_is_raised_to_the_api_without_its_sample_in_any_result(tiny_model, mask_file, tmp_path,
                                                                               monkeypatch):
    """Through the Python API: the error propagates from Generator.run, on_written never ran for the sample."""
    def failing_write(plan, loaded, task, sample, run_digest, started):
        time.sleep(0.05)
        raise NoSpaceError(f"no space left writing {task.image}")

    monkeypatch.setattr(run_module, "write_sample", failing_write)
    written: list[int] = []
    generator, plan = planned(tiny_model, mask_file, tmp_path / "out", 2)
    with pytest.raises(NoSpaceError, match=r"sample_0000_image.nii.gz; 0 sample\(s\) complete"):
        generator.run(plan, on_written=lambda task: written.append(task.index))
    assert written == [] and not list((tmp_path / "out").glob("sample_*"))
    assert not list((tmp_path / "out").glob(".*.lock"))
