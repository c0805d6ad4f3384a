"""The one worker thread of `maisi serve`: loads the networks once (the server is ready then), then runs the queued
jobs in order, each as `maisi generate --out JOBFOLDER` would (Generator.plan_run + Generator.run: complete
samples skipped, per-sample locks)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from maisi_cli.engine.progress import ProgressEvent
from maisi_cli.engine.qc import QCOptions
from maisi_cli.errors import MaisiError
from maisi_cli.serve.jobs import JobStore
from maisi_cli.serve.nim import PayloadError, ServeSettings, generate_request, parse_payload

PROGRESS_INTERVAL_S = 0.5  # the store is written at most this often while a sample denoises


class _Stop(Exception):
    """Raised from the progress callback to end a run: a cancelled job, or a server shutting down. Not a
    MaisiError, so the engine does not take it for a failed sample."""


class Worker:
    """Runs `store`'s jobs with `generator` (a maisi_cli.api.Generator) on its own thread."""

    def __init__(self, store: JobStore, generator: Any, settings: ServeSettings) -> None:
        self.store = store
        self.generator = generator
        self.settings = settings
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._finished = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="maisi-serve-worker", daemon=True)

    # --- control ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop at the next progress event; a running job stays running in the store, and is resumed on restart."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    def wait_finished(self, job_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """The job once it is done, failed or cancelled (None after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._finished:
            while True:
                job = self.store.get(job_id)
                if job is None or job["state"] in ("done", "failed", "cancelled"):
                    return job
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._finished.wait(timeout=min(left, 1.0) if left is not None else 1.0)

    # --- the thread ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._load()
        except Exception as failure:  # the server stays up and says why it is not ready
            self.load_error = str(failure) or type(failure).__name__
            return
        self.ready.set()
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next()
            except Exception:  # a busy or briefly unreadable database: try again, the worker must not die
                self._stopping.wait(1.0)
                continue
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self._run(job)
            with self._finished:
                self._finished.notify_all()

    def _load(self) -> None:
        """The networks of the server's model, loaded before the first request is served."""
        from maisi_cli.serve.nim import RunPayload

        warm = RunPayload(1, (), (), (), None, None, "nifti", None, 0, None)
        request = generate_request(warm, self.settings, False, Path("/nonexistent/maisi-serve-warmup"))
        plan = self.generator.plan_run(request, QCOptions(enabled=False))
        self.generator.networks(plan)

    def _picture_writer(self, plan, warnings: list[str]):
        """`on_written` drawing each pair's pictures, or None: previews off, an image-only model, or files the
        preview does not read (NRRD, DICOM)."""
        if not self.settings.previews or plan.model.image_only or plan.request.output_format not in ("nifti", "nii"):
            return None
        return lambda task, missing_only=False: _pictures(task, self.settings.qc, warnings, missing_only)

    def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        warnings: list[str] = []
        last_write = [0.0]
        state: dict[str, Any] = {"samples_total": 0, "samples_complete": 0, "sample": None, "stage": None,
                                 "done": 0, "total": 0}

        def on_progress(event: ProgressEvent) -> None:
            if self._stopping.is_set() or job_id in self._cancel:
                raise _Stop()
            if event.sample is None:
                return
            if event.stage == "write" and event.finished:
                state["samples_complete"] += 1
            state.update(sample=event.sample, stage=event.stage, done=event.done, total=event.total)
            now = time.monotonic()
            if event.stage == "write" or now - last_write[0] >= PROGRESS_INTERVAL_S:
                last_write[0] = now
                self.store.set_progress(job_id, progress_of(state))

        try:
            if job["cancel_requested"]:
                raise _Stop()
            payload = parse_payload(job["payload"])
            request = generate_request(payload, self.settings, self.generator.spec.uses_body_region,
                                       Path(job["out"]))
            plan = self.generator.plan_run(request, QCOptions(enabled=self.settings.qc,
                                                              max_attempts=self.settings.max_attempts))
            warnings += plan.warnings
            state["samples_total"] = len(plan.samples)
            state["samples_complete"] = len(plan.samples) - len(plan.pending)
            self.store.set_progress(job_id, progress_of(state))
            pictures = self._picture_writer(plan, warnings)
            if pictures is not None:  # complete samples a resumed job skips: only missing pictures are drawn
                for task in plan.samples:
                    if task.complete:
                        pictures(task, missing_only=True)
            report = self.generator.run(plan, on_progress, on_warning=warnings.append, on_written=pictures)
        except _Stop:
            if job_id in self._cancel or (self.store.get(job_id) or {}).get("cancel_requested"):
                self.store.finish(job_id, "cancelled", error="cancelled by DELETE /v1/jobs/{id}")
                self._cancel.discard(job_id)
            return  # shutting down: the job stays running in the store and is resumed on restart
        except (MaisiError, PayloadError) as failure:
            self.store.finish(job_id, "failed", result={"warnings": warnings}, error=str(failure))
            return
        except Exception as failure:  # a bug must not kill the only worker: the job fails with the reason
            self.store.finish(job_id, "failed", result={"warnings": warnings},
                              error=f"internal error: {type(failure).__name__}: {failure}")
            return
        summary = report.as_dict()
        result = {"written": summary["written"], "skipped": summary["skipped"], "locked": summary["locked"],
                  "failed": summary["failed"], "qc_failed": summary["qc_failed"], "seconds": summary["seconds"],
                  "samples": summary["samples"], "warnings": warnings}
        state["samples_complete"] = len(summary["written"]) + len(summary["skipped"])
        self.store.set_progress(job_id, progress_of(state))
        if summary["failed"] or summary["locked"]:
            failed = summary["failed"] or summary["locked"]
            self.store.finish(job_id, "failed", result=result,
                              error=f"sample(s) {', '.join(map(str, failed))} not made; the others are written")
        else:
            self.store.finish(job_id, "done", result=result)


def _pictures(task, qc: bool, warnings: list[str], missing_only: bool = False) -> None:
    """`generate --preview --report` for one written pair: its preview and (checked samples) QC report PNGs; a
    failure is a warning, the sample itself is written."""
    from maisi_cli.engine.preview import write_sample_preview
    from maisi_cli.engine.qc_report import write_sample_report

    try:
        write_sample_preview(task.image, task.label, missing_only=missing_only)
        if qc:
            write_sample_report(task.image, task.label, missing_only=missing_only)
    except (MaisiError, OSError, ValueError) as failure:
        warnings.append(f"sample {task.index}: no preview ({failure})")


def progress_of(state: dict[str, Any]) -> dict[str, Any]:
    """The job's progress as served: samples complete of total, the current sample's stage, a 0..1 fraction."""
    total = state["samples_total"]
    within = state["done"] / state["total"] if state["stage"] == "denoise" and state["total"] else 0.0
    complete = state["samples_complete"]
    fraction = 1.0 if total and complete >= total else ((complete + within) / total if total else 0.0)
    return {"samples_complete": complete, "samples_total": total, "sample": state["sample"], "stage": state["stage"],
            "step": state["done"], "steps": state["total"], "fraction": round(min(fraction, 1.0), 4)}
