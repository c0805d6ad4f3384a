"""Unpack the candidate-mask archive once under MAISI_HOME: checked paths, bounded size, atomic, safe against two
processes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import zipfile
import zlib
from pathlib import Path

from maisi_cli.engine.masks.database import MaskDatabaseError, climbs_out

COMPLETE_MARKER = ".maisi-complete"
# Bounds on what an archive may unpack to, read from the zip's directory before anything is written and enforced
# again on the bytes actually written. The released archive (about 4000 .nii.gz label maps) is far inside them.
MAX_UNPACKED_BYTES = 64 * 2**30
MAX_MEMBERS = 200_000
# Unpacked bytes per archive byte beyond which the archive is taken for a zip bomb: the released members are gzip
# files already (ratio about 1), raw label maps compress some tens of times. Small archives are not held to it.
MAX_RATIO = 100
RATIO_FREE_BYTES = 64 * 2**20
# Raises MAX_UNPACKED_BYTES (a number of GiB), for an archive larger than the released one.
LIMIT_VARIABLE = "MAISI_MASK_ARCHIVE_MAX_GIB"
CHUNK_BYTES = 2**20


def archive_key(archive: Path) -> str:
    stat = archive.stat()
    return hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def unpack_target(archive: Path, cache_root: Path) -> Path:
    """The folder `unpack_archive` puts the archive's files in."""
    return cache_root / f"{archive.name.removesuffix('.zip')}-{archive_key(archive)}"


def is_unpacked(archive: Path, cache_root: Path) -> bool:
    return (unpack_target(archive, cache_root) / COMPLETE_MARKER).is_file()


def size_text(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:.1f} {unit}"


def max_unpacked_bytes() -> int:
    """MAX_UNPACKED_BYTES, or the GiB set in MAISI_MASK_ARCHIVE_MAX_GIB."""
    value = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not value:
        return MAX_UNPACKED_BYTES
    try:
        gib = float(value)
    except ValueError:
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        raise MaskDatabaseError(f"{LIMIT_VARIABLE}: '{value}' is not a size; write a positive number of GiB, e.g. 128")
    return int(gib * 2**30)


def open_archive(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise MaskDatabaseError(f"mask archive: '{archive}' is not a readable zip file ({error}); "
                                "fetch it again") from None


def allowed_bytes(archive: Path) -> tuple[int, str]:
    """(the most bytes the archive may unpack to, the limit in words): the size limit, tightened by the
    compression-ratio bound once past RATIO_FREE_BYTES."""
    size_limit = max_unpacked_bytes()
    ratio_limit = max(RATIO_FREE_BYTES, MAX_RATIO * archive.stat().st_size)
    if ratio_limit < size_limit:
        return ratio_limit, f"the limit of {MAX_RATIO}x its {size_text(archive.stat().st_size)} (a zip bomb?)"
    return size_limit, f"the limit of {size_text(size_limit)} (set {LIMIT_VARIABLE} to raise it)"


def check_members(archive: Path, members: list[zipfile.ZipInfo]) -> None:
    """Refuse the archive from its directory alone, before anything is written: a path outside its folder, a
    symbolic link, too many members, or more declared bytes than allowed."""
    for member in members:
        if climbs_out(member.filename):
            raise MaskDatabaseError(
                f"mask archive: '{archive}' holds '{member.filename}', a path outside its folder; refusing it"
            )
        if (member.external_attr >> 16) & 0o170000 == 0o120000:
            raise MaskDatabaseError(f"mask archive: '{archive}' holds a symbolic link '{member.filename}'; refusing it")
    if len(members) > MAX_MEMBERS:
        raise MaskDatabaseError(f"mask archive: '{archive}' holds {len(members)} members, over the limit of "
                                f"{MAX_MEMBERS}; refusing it")
    declared = sum(member.file_size for member in members)
    limit, limit_text = allowed_bytes(archive)
    if declared > limit:
        raise MaskDatabaseError(f"mask archive: '{archive}' would unpack to {size_text(declared)}, over {limit_text}; "
                                "refusing it")


def inspect_archive(archive: Path) -> None:
    """Every check `unpack_archive` makes before writing, without writing anything (for planning)."""
    with open_archive(archive) as bundle:
        check_members(archive, bundle.infolist())


def extract_bounded(bundle: zipfile.ZipFile, archive: Path, staging: Path) -> None:
    """Extract every member into `staging`, counting the bytes written: a member past its declared size, or the
    whole past the allowed total, stops it (declared sizes can lie)."""
    limit, limit_text = allowed_bytes(archive)
    written = 0
    for member in bundle.infolist():
        destination = staging / member.filename
        if member.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        member_written = 0
        with bundle.open(member) as source, open(destination, "wb") as sink:
            while chunk := source.read(CHUNK_BYTES):
                member_written += len(chunk)
                written += len(chunk)
                if member_written > member.file_size:
                    raise MaskDatabaseError(f"mask archive: '{archive}' member '{member.filename}' unpacks past its "
                                            f"declared {member.file_size} bytes; refusing it, fetch it again")
                if written > limit:
                    raise MaskDatabaseError(f"mask archive: '{archive}' unpacks past {limit_text}; refusing it")
                sink.write(chunk)


def unpack_archive(archive: Path, cache_root: Path) -> Path:
    """The folder holding the archive's files, unpacked once into `cache_root/<name>-<key>`.

    Members are checked before anything is written (a '../' or absolute path refuses the whole archive, as do
    symbolic links, too many members and too many declared bytes); extraction counts the bytes it writes and goes
    to a temporary folder that is renamed into place (removed on any failure); a file lock makes a second process
    wait for the first instead of unpacking twice.
    """
    target = unpack_target(archive, cache_root)
    if is_unpacked(archive, cache_root):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        with open_archive(archive) as bundle:
            check_members(archive, bundle.infolist())
            staging = cache_root / f".{target.name}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                extract_bounded(bundle, archive, staging)
                (staging / COMPLETE_MARKER).write_text(str(archive))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as error:
                # RuntimeError: an encrypted member; NotImplementedError: a compression zipfile cannot read
                fix = (f"free space under {cache_root} (MAISI_HOME) and run again"
                       if getattr(error, "errno", None) == errno.ENOSPC else "fetch it again")
                raise MaskDatabaseError(f"mask archive: '{archive}' could not be unpacked ({error}); {fix}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def mask_root(unpacked: Path, database_entries_first_path: str) -> Path:
    """The folder the database's relative paths start from: the unpacked folder itself, or its single top-level
    folder when the archive wraps everything in one (the released archive does)."""
    if (unpacked / database_entries_first_path).exists():
        return unpacked
    children = [p for p in unpacked.iterdir() if p.is_dir()]
    for child in children:
        if (child / database_entries_first_path).exists():
            return child
    return unpacked
