"""Unpack the candidate-mask archive once under MAISI_HOME: checked paths, atomic, safe against two processes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from maisi_cli.engine.masks.database import MaskDatabaseError

COMPLETE_MARKER = ".maisi-complete"


def unsafe_member(name: str) -> bool:
    """A member that would land outside the target folder: absolute, drive-qualified, or climbing with '..'."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def archive_key(archive: Path) -> str:
    stat = archive.stat()
    return hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def unpack_archive(archive: Path, cache_root: Path) -> Path:
    """The folder holding the archive's files, unpacked once into `cache_root/<name>-<key>`.

    Members are checked before anything is written (a '../' or absolute path refuses the whole archive, as do
    symbolic links); extraction goes to a temporary folder that is renamed into place; a file lock makes a second
    process wait for the first instead of unpacking twice.
    """
    target = cache_root / f"{archive.name.removesuffix('.zip')}-{archive_key(archive)}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        try:
            bundle = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as error:
            raise MaskDatabaseError(f"mask archive: '{archive}' is not a readable zip file ({error}); fetch it again") from None
        with bundle:
            for member in bundle.infolist():
                if unsafe_member(member.filename):
                    raise MaskDatabaseError(
                        f"mask archive: '{archive}' holds '{member.filename}', a path outside its folder; refusing it"
                    )
                if (member.external_attr >> 16) & 0o170000 == 0o120000:
                    raise MaskDatabaseError(f"mask archive: '{archive}' holds a symbolic link '{member.filename}'; refusing it")
            staging = cache_root / f".{target.name}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                bundle.extractall(staging)
                (staging / COMPLETE_MARKER).write_text(str(archive))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise MaskDatabaseError(f"mask archive: '{archive}' could not be unpacked ({error}); fetch it again") from None
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
