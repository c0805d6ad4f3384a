"""A `maisi generate` run into its output folder: each pending sample made under its lock, written (image, label,
then the sidecar that marks it complete), and reported; complete samples are skipped, a failed one is retried by the
next run. The networks come from the caller (the Python API's `Generator`, which loads them once).

A sample's files are written by a background thread (`SampleWriter`) while the next sample is made, so its
compression and disk time hide behind the next denoising. At most one sample is in the writer: a finished sample
waits for the one before it, so the host holds at most one sample being written beside the one being made
(engine/memory.py counts it). What follows a write (its progress event, `on_written`, its result) runs on the caller's
thread once the sidecar is on disk; a failed write stops the run there.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from maisi_cli.engine.locks import SampleLock, remove_stale_partials, sample_lock_path
from maisi_cli.engine.networks import LoadedModel
from maisi_cli.engine.outputs import PairIdentity, write_colour_tables, write_image, write_label, written_sha256
from maisi_cli.engine.plan import GenerationPlan, SampleTask
from maisi_cli.engine.postprocess import ras_affine
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.engine.run_folder import pair_settings_sha256, record_weights, sample_problem, settings_sha256
from maisi_cli.engine.samples import (SAMPLE_STAGES, CheckedSample, WarningCallback, checked_sample_sidecar,
                                      generate_checked_sample)
from maisi_cli.errors import GenerationError, MaskError, NoSpaceError
from maisi_cli.io.files import removed_if_left_empty, writable_folder
from maisi_cli.io.provenance import read_json, write_json


@dataclass
class SampleResult:
    index: int
    seed: int
    # "written"; "skipped" (complete before, or finished by another job meanwhile); "locked" (another live job
    # holds its lock: left to it); "failed" (its generation raised; nothing of it is kept, a re-run retries it)
    status: str
    files: list[str]
    seconds: float = 0.0
    qc: dict[str, Any] | None = None  # {"passed", "failed"} of the kept attempt; None when not checked
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {"attempt", "seed", "passed", "failed"}
    timings: dict[str, float] = field(default_factory=dict)  # the sidecar's timings of a sample written now
    error: str | None = None  # why a "failed" sample failed


@dataclass
class GenerationReport:
    plan: dict[str, Any]
    samples: list[SampleResult]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # run-level: load_s, samples_s, total_s

    def indices(self, status: str) -> list[int]:
        return [s.index for s in self.samples if s.status == status]

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "written": self.indices("written"),
            "skipped": self.indices("skipped"),
            "locked": self.indices("locked"),
            "failed": self.indices("failed"),
            "qc_failed": self.qc_failed,
            "samples": [s.__dict__ for s in self.samples],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "seconds": round(self.seconds, 3),
        }

    @property
    def qc_failed(self) -> list[int]:
        """Indices whose kept attempt failed the quality check (written now, or recorded in a skipped sidecar)."""
        return [s.index for s in self.samples if s.qc is not None and not s.qc["passed"]]


def recorded_result(task: SampleTask) -> SampleResult:
    """A complete sample skipped by this run, with the seed and QC outcome its sidecar recorded."""
    document = read_json(task.sidecar) or {}
    qc = document.get("qc") if isinstance(document.get("qc"), dict) else None
    seed = document.get("sample_seed") if isinstance(document.get("sample_seed"), int) else task.seed
    return SampleResult(task.index, seed, "skipped", task.file_names,
                        qc={"passed": bool(qc.get("passed")), "failed": list(qc.get("failed") or [])} if qc else None,
                        attempts=list(qc.get("attempts") or []) if qc else [])


def sample_affine(plan: GenerationPlan, sample: CheckedSample) -> np.ndarray:
    """The condition mask's grid, or, with no mask (an image-only model), a RAS grid at the plan's spacing."""
    return sample.mask.mask.affine if sample.mask.mask is not None else ras_affine(plan.spacing)


def write_sample(plan: GenerationPlan, loaded: LoadedModel, task: SampleTask, sample: CheckedSample,
                 run_digest: str, started: float) -> dict[str, float]:
    """The sample's image and label, then its sidecar (its presence marks the sample complete for a re-run), each
    written atomically at `task`'s paths; the sample's timings with the write's. `started`: when the sample began
    (total_s is the time from then to the sidecar).

    The timings hold every stage (`samples.SAMPLE_STAGES`, write_s, sidecar_s: the sidecar's content) and other_s,
    what total_s holds beyond them, so the stages and other_s add up to total_s."""
    timings = dict(sample.timings)
    write_start = time.perf_counter()
    affine = sample_affine(plan, sample)
    output_format = plan.request.output_format
    pair_digest = pair_settings_sha256(plan)
    identity = PairIdentity(f"{pair_digest}:{task.index}", plan.model.name, task.seed, task.index)
    files = write_image(task.image, sample.image, affine, output_format, identity)
    files_sha256 = {"image": written_sha256(task.image, files)}
    if task.label is not None and sample.labels is not None:
        label_files = write_label(task.label, sample.labels, affine, output_format, identity, task.image)
        files.update(label_files)
        files_sha256["label"] = written_sha256(task.label, label_files)
        if output_format in ("nifti", "nii"):  # the same bytes for every sample: written with each
            files.update(write_colour_tables(task.image.parent))
    timings["write_s"] = time.perf_counter() - write_start
    sidecar_start = time.perf_counter()
    document = {**checked_sample_sidecar(plan, loaded, sample, timings), "files_sha256": files_sha256,
                "run_settings_sha256": run_digest, "pair_settings_sha256": pair_digest}
    if output_format != "nifti":  # sidecars of NIfTI runs keep their earlier form
        document["format"] = output_format
    document["files_written"] = files  # every file, beside "files" (the pair by role)
    timings["sidecar_s"] = time.perf_counter() - sidecar_start
    timings["total_s"] = time.perf_counter() - started
    timings["other_s"] = max(0.0, timings["total_s"] - sum(v for k, v in timings.items()
                                                           if k not in ("total_s", "other_s")))
    document["timings"] = {k: round(v, 3) for k, v in ordered_timings(timings).items()}
    write_json(task.sidecar, document)
    return ordered_timings(timings)


TIMING_ORDER = (*SAMPLE_STAGES, "write_s", "sidecar_s", "other_s", "total_s")


def ordered_timings(timings: dict[str, float]) -> dict[str, float]:
    """The stages in the order they run, then any other key, total_s last."""
    known = {k: timings[k] for k in TIMING_ORDER if k in timings and k != "total_s"}
    rest = {k: v for k, v in timings.items() if k not in TIMING_ORDER}
    return {**known, **rest, **({"total_s": timings["total_s"]} if "total_s" in timings else {})}


class SampleWriter:
    """One background thread writing finished samples while the caller makes the next one.

    `submit(write, done)` first finishes the sample before (so at most one sample is in the writer), then runs
    `write()` on the thread; `done(future)` runs later on the caller's thread, from `poll()` (when the write has
    ended: call it often, e.g. from progress events), from the next `submit` or from `wait()`. A write's exception
    is raised by `done` through `future.result()`; it is kept and raised again by every later call, so a caller that
    swallows it once still stops there. `close()` waits for a write in flight (its files are then whole or absent)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="maisi-writer")
        self._pending: tuple[Future, Callable[[Future], None]] | None = None
        self._failure: BaseException | None = None

    def submit(self, write: Callable[[], Any], done: Callable[[Future], None]) -> None:
        self.wait()
        self._pending = (self._pool.submit(write), done)

    def poll(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._pending is not None and self._pending[0].done():
            self._finish()

    def wait(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._pending is not None:
            self._finish()

    def _finish(self) -> None:
        future, done = self._pending  # type: ignore[misc]
        self._pending = None
        future.exception()  # waits for the write
        try:
            done(future)
        except BaseException as failure:
            self._failure = failure
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True)


NetworkLoader = Callable[[GenerationPlan, ProgressCallback], LoadedModel]


def run_generation(plan: GenerationPlan, networks: NetworkLoader, on_progress: ProgressCallback = no_progress,
                   on_warning: WarningCallback = lambda message: None,
                   on_written: Callable[[SampleTask], None] | None = None) -> GenerationReport:
    """Make the plan's pending samples. `networks(plan, on_progress)` gives the loaded networks; it is called for
    the first sample this run makes. `on_written(task)` runs after each sample's files are all written (e.g. to
    write its preview).

    Each sample is made under its lock (engine/locks.py): a sample another live job is making is left to it
    ("locked", with a warning); one that another job finished since the plan was made is "skipped". A sample whose
    generation raises a GenerationError or MaskError is "failed" (a warning; nothing of it is kept) and the run
    goes on with the next."""
    started = time.perf_counter()
    run_timings: dict[str, float] = {}
    results = [recorded_result(t) for t in plan.samples if t.complete]
    pending = plan.pending
    loaded: LoadedModel | None = None
    run_digest = settings_sha256(plan)
    writer = SampleWriter()

    def progress(event: ProgressEvent) -> None:
        writer.poll()  # a write that ended reports first, on this thread
        on_progress(event)

    def written(task: SampleTask, sample: CheckedSample, future: Future) -> None:
        """After the writer finished `task`: its event, `on_written`, its result; a failed write stops the run."""
        try:
            timings = future.result()
        except NoSpaceError as failure:
            complete = sum(r.status in ("written", "skipped") for r in results)
            raise NoSpaceError(f"{failure}; {complete} sample(s) complete in {plan.request.out} — free space "
                               "and re-run the same command (it makes only the missing samples)") from None
        qc = {"passed": sample.qc["passed"], "failed": sample.qc["failed"]} if sample.qc else None
        # the sample's result travels with its event: the terminal keeps a line of it (cli/render.py)
        on_progress(ProgressEvent("write", 1, 1, sample=task.index, details={
            "seed": sample.task.seed, "seconds": timings["total_s"], "qc": qc, "attempts": len(sample.attempts)}))
        if on_written is not None:
            on_written(task)
        results.append(SampleResult(task.index, sample.task.seed, "written", task.file_names, timings["total_s"],
                                    qc=qc, attempts=sample.attempts,
                                    timings={k: round(v, 3) for k, v in timings.items()}))

    def write(task: SampleTask, sample: CheckedSample, lock: SampleLock, generated_s: float) -> dict[str, float]:
        """On the writer's thread: the files and the sidecar, then the lock goes (the sample is complete)."""
        try:  # total_s counts this sample's own work: its making, then its write (not the wait in between)
            return write_sample(plan, loaded, task, sample, run_digest, time.perf_counter() - generated_s)
        finally:
            lock.release()

    with removed_if_left_empty(plan.request.out):  # a run that fails before writing leaves no empty --out
        if pending:
            writable_folder(plan.request.out, "--out")
        try:
            for task in pending:
                writer.poll()
                files = task.file_names
                lock = SampleLock(sample_lock_path(task.sidecar))
                if not lock.acquire():
                    on_warning(f"sample {task.index}: another job holds {lock.path.name} and is writing it; left "
                               "to that job")
                    results.append(SampleResult(task.index, task.seed, "locked", files))
                    continue
                handed = False  # once the writer has the sample, it releases the lock after the sidecar
                try:
                    if (not plan.request.overwrite and task.files_exist()
                            and sample_problem(task, run_digest) is None):
                        results.append(recorded_result(task))  # another job finished it after this run was planned
                        continue
                    remove_stale_partials(task.paths)  # left by a killed writer
                    if loaded is None:
                        load_start = time.perf_counter()
                        loaded = networks(plan, progress)
                        run_timings["load_s"] = time.perf_counter() - load_start
                        record_weights(plan, loaded.weight_hashes)  # refuses weights other than the folder's run's
                    sample_start = time.perf_counter()
                    try:
                        sample = generate_checked_sample(plan, loaded, task, progress, on_warning)
                    except (GenerationError, MaskError) as failure:
                        on_warning(f"sample {task.index}: {failure}; skipped (a re-run retries it)")
                        results.append(SampleResult(task.index, task.seed, "failed", files,
                                                    time.perf_counter() - sample_start, error=str(failure)))
                        continue
                    generated_s = time.perf_counter() - sample_start
                    writer.submit(lambda t=task, s=sample, k=lock, g=generated_s: write(t, s, k, g),
                                  lambda future, t=task, s=sample: written(t, s, future))
                    handed = True
                finally:
                    if not handed:
                        lock.release()
            writer.wait()
        finally:
            writer.close()  # after a failure too: a write in flight ends (whole or absent) before the run does
    results.sort(key=lambda r: r.index)
    seconds = time.perf_counter() - started
    run_timings["samples_s"] = sum(r.seconds for r in results if r.status in ("written", "failed"))
    run_timings["total_s"] = seconds
    return GenerationReport(plan.describe(), results, seconds, run_timings)
