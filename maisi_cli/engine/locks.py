"""Per-sample file locks: two jobs writing into one output folder never write the same sample at once.

Before it makes sample k, a run takes an exclusive, non-blocking `flock` on `OUT/.sample_000k.lock` and keeps the
file open while it denoises, decodes and writes; the lock file is removed after the sample's sidecar is written.
When another live process holds the lock, the sample is left to it ("locked"). The kernel releases a lock when
its holder dies, so the lock file a killed job leaves behind holds nothing: a re-run takes it.

No fcntl (Windows): no locking; every lock is granted.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class SampleLock:
    """An exclusive lock on one file. `acquire()` → True when this process now holds it, False when another
    process does; `release(remove=True)` unlinks the file (while still holding it) and closes it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                self._fd = fd
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:
                os.close(fd)
                raise
            # The holder before us may have removed the file between our open and our flock: then we hold a lock
            # on a file no one else can see. Keep it only when the path still names the file we locked.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:
                    pass  # the pid is only a hint for people; the flock is the lock
                return True
            os.close(fd)

    def release(self, remove: bool = True) -> None:
        if self._fd is None:
            return
        try:
            if remove:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "SampleLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def sample_lock_path(sidecar: Path) -> Path:
    """`OUT/sample_0003.json` → `OUT/.sample_0003.lock`."""
    return sidecar.with_name(f".{sidecar.stem}.lock")


def remove_stale_partials(paths: list[Path]) -> None:
    """Temporary files (io/nifti.py write_atomic: `.NAME.PID.partial`) a killed writer of these files left.
    Call only while holding the sample's lock: no live writer of the sample exists then."""
    for path in paths:
        for partial in path.parent.glob(f".{path.name}.*.partial"):
            try:
                partial.unlink()
            except FileNotFoundError:
                pass
