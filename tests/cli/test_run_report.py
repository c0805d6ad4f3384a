"""`maisi generate --json`'s run report: written, skipped, locked, failed, QC and timings."""

from __future__ import annotations

import json

from maisi_cli.engine import samples
from maisi_cli.engine.locks import SampleLock
from maisi_cli.errors import GenerationError
from tests.cli.test_generate import generate


def test_report_lists_written_skipped_locked_failed_and_timings(tiny_model, mask_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real = samples.generate_sample

    def flaky(plan, loaded, task, *args, **kwargs):
        if task.index == 2:
            raise GenerationError("sample 2: the decoder produced 7 non-finite voxels")
        return real(plan, loaded, task, *args, **kwargs)

    monkeypatch.setattr(samples, "generate_sample", flaky)
    held = SampleLock(out / ".sample_0001.lock")  # this process stands in for another live job on sample 1
    assert held.acquire()
    try:
        result = generate(tiny_model, mask_file, out, "-n", "4", "--steps", "2")
    finally:
        held.release()
    assert result.exit_code == 1  # a failed sample fails the run, after the report
    assert "sample(s) 2 failed" in result.stderr and "sample 1: another job holds" in result.stderr
    report = json.loads(result.stdout)
    assert report["written"] == [0, 3] and report["locked"] == [1] and report["failed"] == [2]
    assert report["skipped"] == [] and report["qc_failed"] == []
    assert set(report["timings"]) == {"load_s", "samples_s", "total_s"}
    by_index = {s["index"]: s for s in report["samples"]}
    assert by_index[0]["timings"]["denoise_s"] > 0 and by_index[0]["qc"] is None
    assert "non-finite" in by_index[2]["error"]
    assert not (out / "sample_0002.json").exists() and not (out / "sample_0001_image.nii.gz").exists()

    monkeypatch.setattr(samples, "generate_sample", real)
    report = json.loads(generate(tiny_model, mask_file, out, "-n", "4", "--steps", "2").stdout)
    assert report["written"] == [1, 2] and report["skipped"] == [0, 3]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no lock left behind
