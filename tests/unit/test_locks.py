"""engine/locks.py: a sample lock held by one live process is refused to another; a dead holder's lock is free."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest

from maisi_cli.engine.locks import SampleLock, remove_stale_partials, sample_lock_path

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock locks are POSIX only")


def _hold(path: str, ready, release) -> None:
    lock = SampleLock(Path(path))
    assert lock.acquire()
    ready.set()
    release.wait(30)
    lock.release()


def _try(path: str, answer) -> None:
    lock = SampleLock(Path(path))
    answer.put(lock.acquire())
    lock.release()


def test_a_lock_held_by_another_process_is_refused_then_free(tmp_path):
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    path = str(tmp_path / ".sample_0000.lock")
    ready, release, answer = context.Event(), context.Event(), context.Queue()
    holder = context.Process(target=_hold, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        other = context.Process(target=_try, args=(path, answer))
        other.start()
        other.join(60)
        assert answer.get(timeout=5) is False  # "locked": the holder is alive
        assert not SampleLock(Path(path)).acquire()  # this process too
    finally:
        release.set()
        holder.join(60)
    assert not Path(path).exists()  # the holder removed it when done
    mine = SampleLock(Path(path))
    assert mine.acquire()
    mine.release()


def test_a_killed_holder_leaves_a_file_that_holds_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    path = str(tmp_path / ".sample_0001.lock")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(path, ready, release))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)
    assert Path(path).exists()  # stale: nobody removed it
    lock = SampleLock(Path(path))
    assert lock.acquire()  # the kernel released the dead process's flock
    lock.release()
    assert not Path(path).exists()


def test_lock_path_and_stale_partials(tmp_path):
    assert sample_lock_path(tmp_path / "sample_0003.json") == tmp_path / ".sample_0003.lock"
    image = tmp_path / "sample_0003_image.nii.gz"
    stale = tmp_path / ".sample_0003_image.nii.gz.12345.partial"
    other = tmp_path / ".sample_0004_image.nii.gz.12345.partial"
    stale.write_bytes(b"x")
    other.write_bytes(b"x")
    remove_stale_partials([image])
    assert not stale.exists() and other.exists()
