"""Files written safely on shared storage: never through a symbolic link, never onto something that is not a regular
file, never left half-written, and every failure as one OutputError line.

An output folder on a cluster's shared file system may be written by other users' jobs or hold links left by
someone else. A link at an output, temporary or lock path could make maisi write into a file it was never asked to
touch, so such a path is refused rather than followed: temporary files are created with O_EXCL | O_NOFOLLOW (a name
taken by anything, a link included, is never opened), and the final rename replaces a directory entry without
following it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from maisi_cli.errors import NoSpaceError, OutputError

# Open flags for a file maisi creates: it must not exist yet (so nothing, not even a link, is there to follow).
CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def kind_of(mode: int) -> str:
    """What a non-regular directory entry is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_replaceable(path: Path) -> None:
    """Refuse an output path that holds anything but a regular file (absent is fine): maisi replaces only files it
    could have written itself."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise write_error(error, path) from None
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path} is {kind_of(mode)}, not a file maisi wrote; maisi never writes through links or "
                          "onto other kinds of file: remove it or choose another --out")


def write_error(error: OSError, path: Path) -> OutputError:
    """One line for a failed write of `path`: no space (NoSpaceError), no permission, a read-only file system, …"""
    if error.errno in NO_SPACE:
        return NoSpaceError(f"no space left writing {path}")
    reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "read-only file system", errno.EISDIR: "it is a directory",
              errno.ELOOP: "it is a symbolic link", errno.ENOTDIR: "a part of its folder path is not a folder",
              errno.ENOENT: "its folder does not exist"}.get(error.errno or 0, error.strerror or type(error).__name__)
    return OutputError(f"cannot write {path} ({reason}); choose a folder you can write, e.g. another --out")


def temporary_name(path: Path) -> Path:
    """`.NAME.PID.TOKEN.partial` beside `path` (locks.remove_stale_partials finds those a killed writer left)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def write_atomic(path: Path, payload: bytes) -> str:
    """Write `payload` to `path` through a new temporary file in the same folder, fsynced, then renamed over `path`:
    readers see the old file or the whole new one. Returns the sha256 of the bytes written. Refuses (OutputError, one
    line) a `path` that is a link, a folder or any non-regular file; a full disk is a NoSpaceError; the temporary file
    never outlives a failure."""
    path = Path(path)
    check_replaceable(path)

    def rename_over(temporary: Path) -> None:
        check_replaceable(path)  # again: a folder or device put there meanwhile must not be replaced
        os.replace(temporary, path)  # renames the entry: a link put at `path` meanwhile is replaced, not followed

    placed_from_temporary(path, payload, rename_over)
    return hashlib.sha256(payload).hexdigest()


def write_output_file(path: Path, payload: bytes, option: str) -> None:
    """A file the user named (a picture, a report) written atomically into its folder, made if missing; a folder
    that cannot be made or written is one OutputError naming `option`."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, payload)
    except OutputError:
        raise
    except OSError as error:
        raise OutputError(f"{option}: cannot write '{path}' ({error.strerror or error}); choose a place you can "
                          "write") from None


def create_once(path: Path, payload: bytes) -> bool:
    """Create `path` with `payload` unless something is there already (True when this call made it): the fsynced
    temporary file is hard-linked into place, so a reader never sees it half-written and of two processes racing to
    make it exactly one does."""
    made = []

    def link_into_place(temporary: Path) -> None:
        try:
            os.link(temporary, path)
            made.append(True)
        except FileExistsError:
            pass

    placed_from_temporary(Path(path), payload, link_into_place)
    return bool(made)


def placed_from_temporary(path: Path, payload: bytes, place: Callable[[Path], None]) -> None:
    """Write `payload` to a new temporary file beside `path` (O_EXCL | O_NOFOLLOW), fsync it, `place(temporary)`,
    and remove the temporary file whatever happens; every OSError is one OutputError line naming `path`."""
    temporary = temporary_name(path)
    try:
        descriptor = os.open(temporary, CREATE_NEW, 0o644)
    except OSError as error:
        raise write_error(error, path) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        place(temporary)
    except OSError as error:
        raise write_error(error, path) from None
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def opened_regular(path: Path) -> Iterator[BinaryIO]:
    """`path` open for reading, without following a link: an OSError when it is missing, a link (ELOOP) or not a
    regular file."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(descriptor, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"it is {kind_of(mode)}")
        yield handle


def sha256_of_input(path: Path) -> str:
    """sha256 of a file the user gave as input (a link to it is followed, as reading it does)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_file(path: Path) -> str | None:
    """sha256 of a regular file's bytes, read without following a link; None when it is missing, a link or not a
    regular file (what a sidecar's recorded digest is compared with)."""
    try:
        with opened_regular(path) as handle:
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def writable_folder(folder: Path, field: str = "--out") -> None:
    """Make `folder` (and its parents) and prove a file can be created in it, or one OutputError line naming
    `field`: before any network loads, so a read-only or full target fails in a second, not after the work."""
    probe = temporary_name(Path(folder) / ".maisi-write-test")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, CREATE_NEW, 0o644))  # a new name: nothing there to follow
        os.unlink(probe)
    except OSError as error:
        reason = write_error(error, Path(folder)).args[0] if error.errno in NO_SPACE else error.strerror
        raise OutputError(f"{field}: cannot write to '{folder}' ({reason}); choose a folder you can write") from None


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """A folder this block may create is removed again when the block fails and leaves it empty: a failed run
    leaves nothing behind, not even the folder it made for its outputs."""
    existed = Path(folder).exists()
    try:
        yield
    except BaseException:
        if not existed:
            try:
                Path(folder).rmdir()  # only an empty folder: anything written into it stays
            except OSError:
                pass
        raise
