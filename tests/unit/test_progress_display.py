"""The pieces behind what a person sees while maisi works: the estimates (engine/progress.ProgressClock), the status
and heartbeat line (cli/terminal.Ticker), the interruption's resume line (cli/resume.py) and the training record
(engine/train/metrics.py)."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from maisi_cli.cli import resume, terminal
from maisi_cli.engine.progress import ProgressClock, ProgressEvent
from maisi_cli.engine.train.metrics import METRICS, PLOT, MetricsLog


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_estimates_come_from_the_first_finished_step():
    now = FakeClock()
    clock = ProgressClock(samples=3, now=now)
    clock.update(ProgressEvent("load", 1, 1, subject="unet"))
    assert clock.stage_left() == 0.0 and clock.run_left() is None  # no step of a sample yet
    now.t += 2.0  # the first denoise step: 2 s after the load ended
    clock.update(ProgressEvent("denoise", 1, 10, sample=0))
    assert clock.stage_left() == pytest.approx(18.0)  # 9 steps left at 2 s each
    # the samples' ETA already: this sample ~20 s (its denoise), three of them, 2 s of it done
    assert clock.run_left() == pytest.approx(3 * 20.0 - 2.0)
    now.t += 1.0  # time passes without an event: the estimate counts down
    assert clock.stage_left() == pytest.approx(17.0)
    now.t += 17.0
    clock.update(ProgressEvent("denoise", 10, 10, sample=0))
    now.t += 4.0
    clock.update(ProgressEvent("decode", 1, 1, sample=0))
    now.t += 1.0
    clock.update(ProgressEvent("write", 1, 1, sample=0))  # made in 2 + 18 + 4 + 1 = 25 s
    assert clock.made == [pytest.approx(25.0)]
    assert clock.run_left() == pytest.approx(2 * 25.0)
    now.t += 5.0
    clock.update(ProgressEvent("denoise", 1, 10, sample=1))
    assert clock.samples_made() == pytest.approx(1 + 5 / 25)


def test_a_sample_ends_when_the_next_one_starts_before_its_write_event():
    """A background writer reports a sample's "write" during the next sample: its making ended at that start."""
    now = FakeClock()
    clock = ProgressClock(samples=2, now=now)
    now.t += 10
    clock.update(ProgressEvent("denoise", 1, 1, sample=0))  # sample 0 made in 10 s, its files handed to the writer
    now.t += 4
    clock.update(ProgressEvent("denoise", 1, 2, sample=1))
    now.t += 3
    clock.update(ProgressEvent("write", 1, 1, sample=0))
    assert clock.made == [pytest.approx(10.0)] and clock.written == 1
    assert clock.run_left() == pytest.approx(3.0)  # sample 1 so far: 7 s of the 10 s a sample takes


class Stream(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_heartbeat_off_a_tty_every_interval_unless_something_printed():
    stream = Stream()
    ticker = terminal.Ticker(stream, tty=False, interval=0.1)
    ticker.show(lambda: "beat", grace=0.1)
    time.sleep(0.55)
    ticker.stop()
    beats = stream.getvalue().splitlines()
    assert 3 <= len(beats) <= 6 and set(beats) == {"beat"}

    stream = Stream()
    ticker = terminal.Ticker(stream, tty=False, interval=0.2)
    ticker.show(lambda: "beat", grace=0.2)
    for _ in range(8):  # a line printed every 0.05 s: no heartbeat needed
        time.sleep(0.05)
        ticker.printed()
    ticker.stop()
    assert stream.getvalue() == ""


def test_a_status_off_a_tty_is_logged_only_when_it_lasts():
    stream = Stream()
    ticker = terminal.Ticker(stream, tty=False, interval=10)
    ticker.show("maisi: importing torch and MONAI…", grace=0.3)
    time.sleep(0.1)
    ticker.stop()  # a failure came first: its error line stays the only line
    assert stream.getvalue() == ""
    ticker = terminal.Ticker(stream, tty=False, interval=10)
    ticker.show("maisi: importing torch and MONAI…", grace=0.05)
    time.sleep(0.3)
    ticker.stop()
    assert stream.getvalue() == "maisi: importing torch and MONAI…\n"


def test_a_status_on_a_tty_is_drawn_at_once_and_erased():
    stream = Stream()
    ticker = terminal.Ticker(stream, tty=True)
    ticker.show("maisi: importing torch and MONAI…")
    assert "maisi: importing torch and MONAI…" in stream.getvalue()  # before the thread's first tick
    ticker.stop()
    assert stream.getvalue().endswith("\r\x1b[2K")


def test_resume_line_of_generate_counts_complete_samples_and_drops_overwrite(tmp_path):
    for index in (0, 2):
        (tmp_path / f"sample_{index:04d}.json").write_text("{}")
    (tmp_path / ".sample_0001_image.nii.gz.123.abc.partial").write_text("")  # a half-written file is not complete
    params = {"out": tmp_path, "num_samples": 4, "shard": None, "overwrite": False}
    line = resume.interruption("Ctrl-C", ["maisi", "generate"], params, ["generate", "-n", "4", "--out", str(tmp_path)])
    assert line == (f"interrupted (Ctrl-C): 2 of 4 sample(s) complete in {tmp_path}; to resume (complete samples are "
                    f"skipped), run: maisi generate -n 4 --out {tmp_path}")
    sharded = resume.interruption("SIGTERM", ["maisi", "generate"], {**params, "shard": "0/2", "overwrite": True},
                                  ["generate", "--overwrite", "--shard", "0/2"], started=time.time() + 60)
    assert "0 of 2 sample(s) of shard 0/2 complete" in sharded  # written before this --overwrite run: not counted
    assert sharded.endswith("run (without --overwrite: it would make them again): maisi generate --shard 0/2")


def test_resume_line_of_a_slurm_array_task_counts_its_own_shard(tmp_path, monkeypatch):
    for index in (0, 1, 3):
        (tmp_path / f"sample_{index:04d}.json").write_text("{}")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")  # the run took samples 1 and 3 of 4, as parse_shard reads
    params = {"out": tmp_path, "num_samples": 4, "shard": None, "overwrite": False}
    line = resume.interruption("SIGTERM", ["maisi", "generate"], params, ["generate", "-n", "4"])
    assert "2 of 2 sample(s) of shard 1/2 complete" in line


def test_resume_line_of_training_adds_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(terminal, "facts", {"train_out": tmp_path})  # interrupted in the first epoch
    argv = ["train", "vae", "--data", "d.json", "--out", str(tmp_path), "--init", "ae.pt"]
    assert resume.interruption("Ctrl-C", ["maisi", "train", "vae"], {}, argv) == (
        "interrupted (Ctrl-C): no epoch finished, nothing saved; to start again, run: " + " ".join(["maisi", *argv]))
    (tmp_path / "train_state.pt").write_bytes(b"")
    terminal.facts["epoch"] = (2, 5)  # the renderer saw epoch 2's event (after its save)
    assert resume.interruption("Ctrl-C", ["maisi", "train", "vae"], {}, argv) == (
        f"interrupted (Ctrl-C): epoch 2 of 5 saved in {tmp_path}; to resume, run: maisi train vae --data d.json "
        f"--out {tmp_path} --resume")


def test_metrics_log_continues_a_resumed_run_and_draws_the_curves(tmp_path):
    log = MetricsLog(tmp_path, title="maisi train vae")
    for epoch in (1, 2):
        for step in (1, 2):
            log.step(epoch, step, {"loss": 1.0 / (epoch + step), "kl": 2.0}, 1e-4, 0.5)
        log.epoch(epoch, 3, {"loss": 0.4, "kl": 2.0}, 1e-4, 1.0, 4, {"val_loss": 0.5, "volumes": 1, "epoch": epoch})
        log.write()
    records = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [(r["kind"], r["epoch"], r.get("step")) for r in records] == [
        ("step", 1, 1), ("step", 1, 2), ("epoch", 1, None), ("step", 2, 3), ("step", 2, 4), ("epoch", 2, None)]
    assert records[2]["val"] == {"val_loss": 0.5, "volumes": 1.0}
    with Image.open(tmp_path / PLOT) as image:
        assert image.format == "PNG" and image.size == (900, 900)
    # train_state.pt held epoch 1 only (killed before epoch 2 was saved): its records go, the steps count on
    resumed = MetricsLog(tmp_path, finished_epochs=1)
    resumed.step(2, 1, {"loss": float("nan")}, 1e-4, 0.5)
    assert [r["epoch"] for r in resumed.records] == [1, 1, 1, 2]
    assert resumed.records[-1]["step"] == 3 and resumed.records[-1]["losses"] == {"loss": None}  # JSON has no NaN


def test_result_line_names_the_sample_seed_qc_and_seconds():
    from maisi_cli.cli.render import result_line

    written = ProgressEvent("write", 1, 1, sample=3, details={"seed": 1234, "seconds": 12.34, "attempts": 1,
                                                              "qc": {"passed": True, "failed": []}})
    assert result_line(written, None) == "sample 0003  seed 1234  QC passed  12.3 s"
    failed = ProgressEvent("write", 1, 1, sample=4, case="ct_042",
                           details={"seed": 7, "seconds": 3.0, "attempts": 3,
                                    "qc": {"passed": False, "failed": ["liver", "spleen"]}})
    assert result_line(failed, None) == "ct_042 sample 0004  seed 7  QC FAILED (liver, spleen)  3 attempts  3.0 s"
    assert result_line(ProgressEvent("write", 1, 1, sample=0, details={"seed": 1, "qc": None}), 2.0) == \
        "sample 0000  seed 1  QC off  2.0 s"
    assert result_line(ProgressEvent("write", 1, 1, sample=0), 2.04) == "sample 0000  2.0 s"  # no details: time
