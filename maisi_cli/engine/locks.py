"""Per-sample file locks: two jobs writing into one output folder never write the same sample at once.

Before it makes sample k, a run takes an exclusive, non-blocking `flock` on `OUT/.sample_000k.lock` and keeps the
file open while it denoises, decodes and writes; the lock file is removed after the sample's sidecar is written.
When another live process holds the lock, the sample is left to it ("locked"). The kernel releases a lock when
its holder dies, so the lock file a killed job leaves behind holds nothing: a re-run takes it.

No fcntl (Windows): no locking; every lock is granted.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from maisi_cli.errors import OutputError
from maisi_cli.io.files import kind_of, write_error

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
            fd = open_lock_file(self.path)
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
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
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
            if remove and self._names_held_file():
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def _names_held_file(self) -> bool:
        """Whether the lock path still names the file this lock holds (not something put there since)."""
        try:
            return os.lstat(self.path).st_ino == os.fstat(self._fd).st_ino
        except (FileNotFoundError, TypeError):
            return False

    def __enter__(self) -> "SampleLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file, created if absent. A link, a non-regular file or a file with other names (a
    hard link: truncating it would clobber another file) at the lock path is refused in one line: the pid written
    into a lock file must never land in a file someone else put there."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link; maisi never writes through links: remove it") from None
        raise write_error(error, path) from None
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(fd)
        what = kind_of(status.st_mode) if not stat.S_ISREG(status.st_mode) else "a file with other names (hard link)"
        raise OutputError(f"{path} is {what}, not a lock file maisi made; remove it")
    return fd


def sample_lock_path(sidecar: Path) -> Path:
    """`OUT/sample_0003.json` → `OUT/.sample_0003.lock`."""
    return sidecar.with_name(f".{sidecar.stem}.lock")


def remove_stale_partials(paths: list[Path]) -> None:
    """Temporary files (io/files.py write_atomic: `.NAME.PID.TOKEN.partial`) a killed writer of these files left.
    Call only while holding the sample's lock: no live writer of the sample exists then."""
    for path in paths:
        for partial in path.parent.glob(f".{path.name}.*.partial"):
            try:
                if partial.is_dir() and not partial.is_symlink():  # a DICOM series being written (engine/outputs.py)
                    shutil.rmtree(partial)
                else:
                    partial.unlink()
            except FileNotFoundError:
                pass
