"""Repository files on the Hugging Face hub (engine/store.py `RepoFile`: a model's files, or a single file such as
the `maisi fid` feature extractor): download, verify against the sha256 lock, offline import, where each is read.

- Download: `huggingface_hub.hf_hub_download` into the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`),
  read in place from there (no second copy). huggingface_hub writes each file under a temporary name and renames it
  when complete; a dropped connection is resumed with a Range request within the run; a failed run leaves nothing
  under the final name.
- Lock: the first download or import of a file records its sha256 and size (engine/store.py); every later download,
  import, `verify` and `generate` is held to it.
- Import: a model's files brought from another machine (a folder with the repository layout, e.g. `DIR/models/x.pt`)
  are copied into maisi's store (atomically), checked against the lock.

Environment read at call time: `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN` (by huggingface_hub), `HF_HUB_CACHE`,
`HF_HOME`, `MAISI_HOME`. No Typer or rich here; progress goes to `on_progress` as ProgressEvents
(engine/progress.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import huggingface_hub
from huggingface_hub import constants as hub_constants

from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, Stage, no_progress
from maisi_cli.engine.store import (RepoFile, download_command, hf_hub_cache, lock_path, locked_sha256, managed_copies,
                                    model_files, model_reference, read_lock, record_in_lock, remember_sha256, sha256_of,
                                    store_dir)
from maisi_cli.engine.weights import first_sentence, locate_file
from maisi_cli.errors import UsageError, WeightsError
from maisi_cli.models import ModelSpec

_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- which files -------------------------------------------------------------------------------------------------
def repo_files(spec: ModelSpec, components: Iterable[str] = (), models_only: bool = False) -> list[RepoFile]:
    """The spec's weight files, then its data files; `components` picks a subset (UsageError on an unknown one)."""
    everything = model_files(spec)
    wanted = list(dict.fromkeys(components))
    by_component = {f.component: f for f in everything}
    unknown = [c for c in wanted if c not in by_component]
    if unknown:
        raise UsageError(f"--component: model {spec.name} has no file '{unknown[0]}'; "
                         f"its components: {', '.join(by_component)}")
    if wanted:
        chosen = [by_component[c] for c in wanted]
        skipped = [f.component for f in chosen if f.kind == "datasets"] if models_only else []
        if skipped:
            raise UsageError(f"--component: '{skipped[0]}' is a data file and --models-only skips data files; "
                             "drop one of the two")
        return chosen
    return [f for f in everything if not (models_only and f.kind == "datasets")]


def with_revision(spec: ModelSpec, revision: str | None) -> ModelSpec:
    """The spec with another repository revision (`--revision`)."""
    if not revision or revision == spec.hf_revision:
        return spec
    return spec.model_copy(update={"hf_revision": revision})


def require_repository(spec: ModelSpec) -> str:
    if not spec.hf_repo:
        raise UsageError(f"MODEL: {spec.name} has no Hugging Face repository (its weights ship with it or come from "
                         "--weights-dir); nothing to fetch")
    return spec.hf_repo


def _require_repositories(files: Iterable[RepoFile]) -> None:
    """A file without a repository belongs to a model whose files ship with it: nothing to fetch or verify."""
    for item in files:
        if not item.repo and item.spec is not None:
            require_repository(item.spec)


# The published RadImageNet ResNet-50 (no top) in the state-dict layout of `Warvito/radimagenet-models`, the network
# the reference FID script loads through torch.hub (which fetches it from Google Drive with gdown). MONAI hosts the
# same layout on the Hugging Face hub for its perceptual loss (`Project-MONAI/perceptual-models`, which downloads
# `MONAI/checkpoints/RadImageNet-ResNet50_notop.pth` with hf_hub_download); maisi fetches it from there. Its name is
# the built-in extractor's (engine/fid.py), which no `maisi.extractors` plugin may take.
EXTRACTOR_FILES = {
    "radimagenet-resnet50": RepoFile(
        component="radimagenet-resnet50", repo_name="RadImageNet-ResNet50_notop.pth", repo="MONAI/checkpoints",
        hand_placed_in="fid",
        licence="see the Hugging Face repository MONAI/checkpoints and the RadImageNet terms (radimagenet.com)"),
}


def extractor_file(name: str, revision: str | None = None) -> RepoFile | None:
    """The feature extractor's file called `name` (any case), at `revision` when one is given (`--revision`)."""
    item = EXTRACTOR_FILES.get(name.strip().lower())
    if item is None or not revision or revision == item.revision:
        return item
    return replace(item, revision=revision, pinned=True)


def extractor_files(name: str | None = None, revision: str | None = None) -> list[RepoFile]:
    """The extractor files `maisi weights list|path|verify` show: every one (no name), the one named, or none (a
    model's name)."""
    names = list(EXTRACTOR_FILES) if name is None else [name]
    return [item for item in (extractor_file(n, revision) for n in names) if item is not None]


# --- download ------------------------------------------------------------------------------------------------------
class _OfFile:
    """What a result says of its file (the fields of a row and of its JSON document)."""

    file: RepoFile

    @property
    def component(self) -> str:
        return self.file.component

    @property
    def repo_name(self) -> str:
        return self.file.repo_name

    @property
    def kind(self) -> str:
        return self.file.kind


@dataclass
class FileResult(_OfFile):
    file: RepoFile
    path: Path | None
    status: str  # downloaded | cached | stored | imported | not in folder
    sha256: str | None = None
    size: int | None = None
    lock: str | None = None  # recorded (first time) | matches

    def document(self) -> dict[str, Any]:
        return {"component": self.component, "file": self.repo_name, "kind": self.kind,
                "path": str(self.path) if self.path else None, "status": self.status, "sha256": self.sha256,
                "size": self.size, "lock": self.lock}


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """HF_HUB_OFFLINE as it is now (huggingface_hub reads it once, at import)."""
    return _true(os.environ.get("HF_HUB_OFFLINE")) or bool(hub_constants.HF_HUB_OFFLINE)


def _endpoint() -> str | None:
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _without_hub(item: RepoFile, how: str) -> str:
    """How to bring the file without the hub: `how` and the import command for a model's files, the copy brought by
    hand for a single file."""
    if item.spec is None:
        return f"copy {item.repo_name} to '{item.hand_placed}'"
    return f"{how}: maisi weights import DIR {model_reference(item.spec)}"


Reporter = Callable[[int, int], None]  # (done, total) of one file's bytes


def _reporter(on_progress: ProgressCallback, stage: Stage, item: RepoFile) -> Reporter:
    return lambda done, total: on_progress(ProgressEvent(stage, done, total, subject=item.repo_name))


def _progress_bar(report: Reporter, used: list[bool]) -> type:
    """A tqdm stand-in for huggingface_hub: forwards byte counts to `report`. The final (done == total) report is
    left to the caller, once per file, so a log line per file is printed off a TTY whether or not it downloaded."""

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
            used[0] = True
            self.total, self.n = total or 0, initial or 0

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> bool:
            return False

        def update(self, n: int = 1) -> None:
            self.n += n
            if self.total and 0 <= self.n < self.total:
                report(self.n, self.total)

        def close(self) -> None:
            pass

    return Bar


@contextlib.contextmanager
def _quiet_hub_logger() -> Iterator[None]:
    """huggingface_hub logs retries ("Trying to resume download...") on stderr; errors reach the user as one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _http_errors() -> type[BaseException] | tuple[type[BaseException], ...]:
    """The HTTP client's own errors (a dropped connection after huggingface_hub's retries)."""
    try:
        from httpx2 import (
            HTTPError,  # what this huggingface_hub release speaks; 150 ms, so only when downloading
        )
    except ImportError:  # another huggingface_hub release, another client
        return ()
    return HTTPError


def _commit_of(path: Path) -> str | None:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _download_error(error: BaseException, item: RepoFile) -> Exception:
    """huggingface_hub's exceptions as one actionable line (a model's files name their model and its spec)."""
    from huggingface_hub import (
        errors,  # loads the HTTP client (150 ms): only once a download has failed
    )

    repo, revision, name, in_model = item.repo, item.revision, item.repo_name, item.spec is not None
    if isinstance(error, errors.RevisionNotFoundError):
        return UsageError(f"--revision: {repo} has no revision '{revision}'; use a branch, tag or commit it has")
    if isinstance(error, errors.GatedRepoError):
        login = " (or run `hf auth login`)" if in_model else ""
        return WeightsError(f"weights: {repo} is gated: accept its licence on the hub, then set HF_TOKEN{login} and "
                            "run the command again")
    if isinstance(error, errors.RepositoryNotFoundError) or (
            isinstance(error, errors.HfHubHTTPError) and getattr(error.response, "status_code", None) == 401):
        check = ("check the model's hf_repo, set HF_TOKEN for a private repository, or check HF_ENDPOINT" if in_model
                 else "set HF_TOKEN or check HF_ENDPOINT")
        return WeightsError(f"weights: {repo} was not found or needs a token: {check}")
    if isinstance(error, errors.RemoteEntryNotFoundError):
        check = f" ({item.label}); check the model spec or --revision" if in_model else "; check --revision"
        return WeightsError(f"weights: {repo}@{revision} has no file {name}{check}")
    what = f"{name} ({item.label})"
    if isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) and offline():
        return WeightsError(f"weights: {what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set (offline); "
                            f"unset it to download, or "
                            f"{_without_hub(item, 'bring the files from another machine and run')}")
    cause = error
    while isinstance(cause, (ValueError, errors.LocalEntryNotFoundError)) and cause.__cause__ is not None:
        cause = cause.__cause__  # "Force download failed due to the above error." and friends wrap the real one
    return WeightsError(f"weights: downloading {what} from {_endpoint() or 'the Hugging Face hub'} failed "
                        f"({first_sentence(cause)}); nothing was kept under its name: check the network (or "
                        f"HF_ENDPOINT) and run the command again, or {_without_hub(item, 'import the files')}")


def _fetch_locked(item: RepoFile, locked: dict[str, Any] | None, *, force: bool, is_offline: bool,
                  report: Reporter) -> tuple[Path, str, int, bool]:
    """One file through `hf_hub_download` (into the Hugging Face cache, or found there), hashed and held to the
    lock — recorded when it has no entry yet: (path, sha256, size, downloaded now)."""
    # Looked up before the logger is quieted: huggingface_hub configures its logger when the module first loads.
    hf_hub_download = huggingface_hub.hf_hub_download
    repo, revision = item.repo or "", item.revision
    used = [False]
    try:
        with _quiet_hub_logger():
            pointer = hf_hub_download(repo, item.repo_name, revision=revision, cache_dir=hf_hub_cache(),
                                      force_download=force, local_files_only=is_offline, endpoint=_endpoint(),
                                      tqdm_class=_progress_bar(report, used))
    except (OSError, ValueError, ConnectionError, _http_errors()) as error:
        raise _download_error(error, item) from error
    path = Path(pointer)
    digest = sha256_of(path)
    size = path.stat().st_size
    blob = path.resolve().name
    fix = f"{download_command([item])} --force"
    if _SHA256.fullmatch(blob) and blob != digest:  # LFS blobs are named by their sha256
        raise WeightsError(f"weights: {path} ({item.label}) does not match the sha256 the hub gives for it (corrupt); "
                           f"re-fetch it with: {fix}")
    if locked and locked.get("sha256") != digest:
        if used[0]:
            raise WeightsError(
                f"weights: {repo}@{revision} now serves a different {item.repo_name} than the one locked in "
                f"{lock_path(repo, revision)}; if the repository changed on purpose, delete that lock file and "
                f"download again, or pin --revision to the commit you locked")
        raise WeightsError(f"weights: {path} ({item.label}) no longer matches the sha256 locked in "
                           f"{lock_path(repo, revision)} (changed or corrupt); re-fetch it with: {fix}")
    if not locked:
        record_in_lock(repo, revision, item.repo_name, digest, size, "download", _commit_of(path))
    return path, digest, size, used[0]


def _download_one(item: RepoFile, force: bool, is_offline: bool, on_progress: ProgressCallback) -> FileResult:
    """One file: the copy in maisi's store when it matches the lock (a model's file), else `_fetch_locked`."""
    repo, revision = item.repo or "", item.revision
    report = _reporter(on_progress, "download", item)
    locked = read_lock(repo, revision).get(item.repo_name)
    stored = item.stored
    if stored is not None and stored.is_file():
        stored_sha = sha256_of(stored)
        if locked and locked.get("sha256") != stored_sha:
            if not force:
                raise WeightsError(
                    f"weights: {stored} ({item.label}) no longer matches the sha256 locked in "
                    f"{lock_path(repo, revision)}; re-fetch it with: {download_command([item])} --force")
            stored.unlink()  # a corrupt copy in maisi's own store: drop it, the download below replaces it
        elif not force:
            size = stored.stat().st_size
            report(size, size)
            return FileResult(item, stored, "stored", stored_sha, size, "matches" if locked else None)
    path, digest, size, downloaded = _fetch_locked(item, locked, force=force, is_offline=is_offline, report=report)
    report(size, size)
    return FileResult(item, path, "downloaded" if downloaded else "cached", digest, size,
                      "matches" if locked else "recorded")


def download(files: list[RepoFile], force: bool = False,
             on_progress: ProgressCallback | None = None) -> list[FileResult]:
    """Fetch files into the Hugging Face cache (or find them there, or in the import store), hash them, and hold
    them to the lock: the first download records a file; a later one must match it."""
    _require_repositories(files)
    on_progress = on_progress or no_progress
    is_offline = offline()
    if force and is_offline and files:
        raise WeightsError("--force: HF_HUB_OFFLINE is set, so nothing can be re-fetched; unset it, or "
                           f"{_without_hub(files[0], 'bring intact files from another machine and run')}")
    return [_download_one(item, force, is_offline, on_progress) for item in files]


# --- verify --------------------------------------------------------------------------------------------------------
@dataclass
class CheckResult(_OfFile):
    file: RepoFile
    where: str | None  # store | hf-cache | None (missing)
    path: Path | None
    status: str  # ok | mismatch | unlocked | missing
    sha256: str | None = None
    expected: str | None = None

    def document(self) -> dict[str, Any]:
        return {"component": self.component, "file": self.repo_name, "kind": self.kind, "where": self.where,
                "path": str(self.path) if self.path else None, "status": self.status, "sha256": self.sha256,
                "locked_sha256": self.expected}


def verify(files: list[RepoFile], on_progress: ProgressCallback | None = None,
           hashed: dict[Path, str] | None = None) -> list[CheckResult]:
    """Re-hash every copy maisi manages (import store, Hugging Face cache; not a single file's copy brought by hand,
    which is the user's own as a --weights-dir file) and compare it with the lock. Nothing raises for a mismatch:
    see `mismatch_error`. `hashed` shares digests between calls (same run)."""
    _require_repositories(files)
    on_progress = on_progress or no_progress
    hashed = {} if hashed is None else hashed
    results = []
    for item in files:
        copies = list(managed_copies(item))
        expected = locked_sha256(item)
        if not copies:  # with `expected`: locked, so it was fetched once, and is gone
            results.append(CheckResult(item, None, None, "missing", None, expected))
            continue
        for path, where in copies:
            key = path.resolve()
            if key not in hashed:
                hashed[key] = sha256_of(path, fresh=True)
            digest = hashed[key]
            status = "unlocked" if expected is None else ("ok" if digest == expected else "mismatch")
            results.append(CheckResult(item, where, path, status, digest, expected))
        on_progress(ProgressEvent("hash", 1, 1, subject=item.repo_name))
    return results


def locked_but_missing(results: list[CheckResult]) -> list[CheckResult]:
    """The files the lock holds (fetched once) of which maisi manages no copy any more."""
    return [r for r in results if r.status == "missing" and r.expected is not None]


def mismatch_error(results: list[CheckResult]) -> WeightsError | None:
    """One line naming the first file (of one model, or one single file) that does not match the lock and the
    command that re-fetches it, else the first locked file that is missing and the command that fetches it."""
    bad = [r for r in results if r.status == "mismatch"]
    if not bad:
        return missing_error(results)
    first = bad[0]
    fix, more = fetch_fix(bad)
    return WeightsError(
        f"weights: {first.path} ({first.file.label}) does not match the sha256 locked in "
        f"{lock_path(first.file.repo or '', first.file.revision)}{more}; re-fetch with: {fix} --force"
    )


def fetch_fix(rows: list[CheckResult]) -> tuple[str, str]:
    """(the command that fetches the files of `rows`, " (and N more)" when there are several) for an error line."""
    return download_command([r.file for r in rows]), f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""


def missing_error(results: list[CheckResult]) -> WeightsError | None:
    gone = locked_but_missing(results)
    if not gone:
        return None
    first = gone[0]
    fix, more = fetch_fix(gone)
    places = "the Hugging Face cache" if first.file.stored is None else "maisi's store and the Hugging Face cache"
    return WeightsError(
        f"weights: {first.repo_name} ({first.file.label}) is locked in "
        f"{lock_path(first.file.repo or '', first.file.revision)} but missing from {places}{more}; fetch it with: {fix}"
    )


# --- import --------------------------------------------------------------------------------------------------------
def _copy_hashing(source: Path, temporary: Path, report: Reporter) -> str:
    digest = hashlib.sha256()
    total = source.stat().st_size
    done = 0
    with open(source, "rb") as reader, open(temporary, "wb") as writer:
        for block in iter(lambda: reader.read(1 << 22), b""):
            digest.update(block)
            writer.write(block)
            done += len(block)
            if done < total:
                report(done, total)
        writer.flush()
        os.fsync(writer.fileno())
    shutil.copystat(source, temporary)
    return digest.hexdigest()


def import_folder(folder: Path, spec: ModelSpec, on_progress: ProgressCallback | None = None) -> list[FileResult]:
    """Copy the model's files found in `folder` (under their repository names) into maisi's store. Every file is
    checked against the lock before any is put in place: a mismatch refuses the import and leaves nothing behind.
    Files with no lock entry are recorded. Needs no network."""
    repo = require_repository(spec)
    revision = spec.hf_revision
    on_progress = on_progress or no_progress
    folder = folder.expanduser()
    if not folder.is_dir():
        raise UsageError(f"DIR: '{folder}' is not a folder; pass the folder that holds models/… and datasets/…")
    files = repo_files(spec)
    present = [f for f in files if (folder / f.repo_name).is_file()]
    if not present:
        example = folder / files[0].repo_name if files else folder
        raise WeightsError(f"weights: {folder} holds none of {spec.name}'s files; they go under their repository "
                           f"names, e.g. {example}")
    lock = read_lock(repo, revision)
    target = store_dir(repo, revision)
    temporaries: list[Path] = []
    staged: list[tuple[RepoFile, Path, str, int]] = []
    try:
        for item in present:
            source = folder / item.repo_name
            destination = target / item.repo_name
            destination.parent.mkdir(parents=True, exist_ok=True)
            temporary = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
            temporaries.append(temporary)
            report = _reporter(on_progress, "import", item)
            digest = _copy_hashing(source, temporary, report)
            expected = (lock.get(item.repo_name) or {}).get("sha256")
            if expected and expected != digest:
                raise WeightsError(
                    f"weights: {source} does not match the sha256 locked for {item.repo_name} in "
                    f"{lock_path(repo, revision)} (expected {expected[:12]}…, got {digest[:12]}…); nothing was "
                    f"imported: bring an intact copy")
            size = temporary.stat().st_size
            staged.append((item, temporary, digest, size))
            report(max(size, 1), max(size, 1))
        results = []
        for item, temporary, digest, size in staged:
            destination = target / item.repo_name
            os.replace(temporary, destination)
            remember_sha256(destination, digest)
            had_entry = item.repo_name in lock
            if not had_entry:
                record_in_lock(repo, revision, item.repo_name, digest, size, f"import from {folder}")
            results.append(FileResult(item, destination, "imported", digest, size,
                                      "matches" if had_entry else "recorded"))
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    missing = [f for f in files if f not in present]
    return results + [FileResult(f, None, "not in folder") for f in missing]


# --- how large a file is before it is fetched ---------------------------------------------------------------------
@dataclass(frozen=True)
class ExpectedSize:
    """A file's size before it is downloaded, and where that came from: "lock" (it was fetched once), "spec" (the
    model spec's `file_sizes`), "hub" (the hub's metadata); None bytes: not known ("offline", "hub not reachable",
    "hub: not found there", "no repository")."""

    bytes: int | None
    source: str

    def document(self) -> dict[str, Any]:
        return {"size": self.bytes, "size_source": self.source}


HUB_SIZE_TIMEOUT_S = 5.0  # a metadata request is one HEAD; a hub that does not answer soon is reported as unknown


def expected_size(item: RepoFile, is_offline: bool | None = None) -> ExpectedSize:
    """The size `maisi weights download` would fetch for `item`: the lock's record, the spec's `file_sizes`, else
    the hub's metadata (one HEAD request; not offline), else unknown."""
    if item.repo:
        locked = (read_lock(item.repo, item.revision).get(item.repo_name) or {}).get("size")
        if isinstance(locked, int):
            return ExpectedSize(locked, "lock")
    if item.spec is not None and item.repo_name in item.spec.file_sizes:
        return ExpectedSize(item.spec.file_sizes[item.repo_name], "spec")
    if not item.repo:
        return ExpectedSize(None, "no repository")
    if offline() if is_offline is None else is_offline:
        return ExpectedSize(None, "offline")
    try:
        with _quiet_hub_logger():
            url = huggingface_hub.hf_hub_url(item.repo, item.repo_name, revision=item.revision, endpoint=_endpoint())
            metadata = huggingface_hub.get_hf_file_metadata(url, timeout=HUB_SIZE_TIMEOUT_S)
    except Exception as error:  # any failure leaves the size unknown; the download itself reports it properly
        absent = type(error).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError", "RepositoryNotFoundError",
                                          "RevisionNotFoundError", "GatedRepoError")
        return ExpectedSize(None, "hub: not found there" if absent else "hub not reachable")
    return ExpectedSize(metadata.size, "hub") if metadata.size is not None else ExpectedSize(None, "hub gave none")


def expected_sizes(items: Iterable[RepoFile]) -> list[ExpectedSize]:
    """`expected_size` of each; once the hub failed to answer, the others are not asked (each would wait)."""
    sizes: list[ExpectedSize] = []
    failed: str | None = None
    for item in items:
        size = expected_size(item, is_offline=True) if failed else expected_size(item)
        if failed and size.source == "offline":
            size = ExpectedSize(None, failed)
        elif size.source == "hub not reachable":
            failed = size.source
        sizes.append(size)
    return sizes


def size_text(size: ExpectedSize) -> str:
    """`1.2 GB`, or why it is not known: `size unknown (offline)`."""
    if size.bytes is None:
        return f"size unknown ({size.source})"
    return decimal_size(size.bytes)


def decimal_size(count: int) -> str:
    """Bytes in decimal units as the hub shows them: 512 B, 79.9 MB, 2.7 GB."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


# --- where each file is --------------------------------------------------------------------------------------------
@dataclass
class Location(_OfFile):
    file: RepoFile
    path: Path | None
    source: str | None  # weights-dir | bundled | store | hf-cache | path | hand-placed (a single file's own copy)
    size: int | None
    locked: bool

    def document(self) -> dict[str, Any]:
        return {"component": self.component, "file": self.repo_name, "kind": self.kind,
                "path": str(self.path) if self.path else None, "where": self.source,
                "present": self.path is not None, "size": self.size, "locked": self.locked}


def locations(files: list[RepoFile], weights_dir: Path | None = None) -> list[Location]:
    """Where each file would be read from (the order `generate` and `maisi fid` use), or None."""
    found = []
    for item in files:
        hit = locate_file(item, weights_dir)
        path, source = hit if hit else (None, None)
        locked = bool(item.repo) and item.repo_name in read_lock(item.repo or "", item.revision)
        found.append(Location(item, path, source, path.stat().st_size if path else None, locked))
    return found
