"""A model's repository files on the Hugging Face hub: download, sha256 lock, verify, offline import.

- Download: `huggingface_hub.hf_hub_download` into the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`),
  read in place from there (no second copy). huggingface_hub writes each file under a temporary name and renames it
  when complete; a dropped connection is resumed with a Range request within the run; a failed run leaves nothing
  under the final name.
- Lock: `MAISI_HOME/locks/<owner>--<name>@<revision>.json` maps each repository file name to the sha256 and size it
  had when maisi first downloaded or imported it. Every later download, import, `verify` and `generate` is held to it.
- Import: files brought from another machine (a folder with the repository layout, e.g. `DIR/models/x.pt`) are
  copied into `MAISI_HOME/weights/<owner>--<name>/<revision>/` (atomically), checked against the lock.

Environment read at call time: `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN` (by huggingface_hub), `HF_HUB_CACHE`,
`HF_HOME`, `MAISI_HOME`. No Typer or rich here; progress goes through `on_progress(stage, done, total)`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from maisi_cli.config import maisi_home
from maisi_cli.engine.weights import (fetch_command, first_sentence, hash_file, hf_hub_cache, model_reference,
                                      remember_sha256, sha256_of)
from maisi_cli.errors import UsageError, WeightsError
from maisi_cli.models import ModelSpec

ProgressCallback = Callable[[str, int, int], None]
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


# --- which files -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepoFile:
    component: str  # a key of the spec's `weights` or `datasets`
    repo_name: str  # the file's path inside the repository, e.g. models/autoencoder_v1.pt
    kind: str  # "weights" or "datasets"


def repo_files(spec: ModelSpec, components: Iterable[str] = (), models_only: bool = False) -> list[RepoFile]:
    """The spec's weight files, then its data files; `components` picks a subset (UsageError on an unknown one)."""
    everything = [RepoFile(c, n, "weights") for c, n in spec.weights.items()]
    everything += [RepoFile(c, n, "datasets") for c, n in spec.datasets.items()]
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


# --- where files live ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return text.replace("/", "--")


def lock_path(repo: str, revision: str) -> Path:
    return maisi_home() / "locks" / f"{_slug(repo)}@{_slug(revision)}.json"


def store_dir(repo: str, revision: str) -> Path:
    """maisi's import store for one repository revision; files keep their repository names below it."""
    return maisi_home() / "weights" / _slug(repo) / _slug(revision)


def cached_file(spec: ModelSpec, repo_name: str) -> Path | None:
    """The file in the Hugging Face cache for the spec's repository and revision, or None (no network)."""
    if not spec.hf_repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hf_repo, repo_name, revision=spec.hf_revision, cache_dir=hf_hub_cache())
    return Path(cached) if isinstance(cached, str) else None


def managed_copies(spec: ModelSpec, repo_name: str) -> list[tuple[str, Path]]:
    """(where, path) of each copy maisi manages: the import store first (it wins), then the Hugging Face cache."""
    copies = []
    stored = store_dir(require_repository(spec), spec.hf_revision) / repo_name
    if stored.is_file():
        copies.append(("store", stored))
    cached = cached_file(spec, repo_name)
    if cached is not None:
        copies.append(("hf-cache", cached))
    return copies


# --- the lock ------------------------------------------------------------------------------------------------------
def read_lock(repo: str, revision: str) -> dict[str, dict[str, Any]]:
    """Repository file name → {"sha256", "size", …}; empty when nothing is locked yet."""
    from maisi_cli.io.provenance import read_json

    document = read_json(lock_path(repo, revision)) or {}
    files = document.get("files")
    return files if isinstance(files, dict) else {}


def record_in_lock(repo: str, revision: str, repo_name: str, sha256: str, size: int, source: str,
                   commit: str | None = None) -> None:
    """Add one file to the lock (written atomically). An existing entry is never replaced here."""
    from maisi_cli.io.provenance import write_json

    path = lock_path(repo, revision)
    files = read_lock(repo, revision)
    if repo_name in files:
        return
    files[repo_name] = {
        "sha256": sha256, "size": size, "source": source, "commit": commit,
        "locked": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"repo": repo, "revision": revision, "files": dict(sorted(files.items()))})


# --- download ------------------------------------------------------------------------------------------------------
@dataclass
class FileResult:
    component: str
    repo_name: str
    kind: str
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
    from huggingface_hub import constants

    return _true(os.environ.get("HF_HUB_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str | None:
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _import_hint(spec: ModelSpec) -> str:
    return f"maisi weights import DIR {model_reference(spec)}"


def _progress_bar(stage: str, on_progress: ProgressCallback, used: list[bool]) -> type:
    """A tqdm stand-in for huggingface_hub: forwards byte counts to on_progress. The final (done == total) report is
    left to the caller, once per file, so a log line per file is printed off a TTY whether or not it downloaded."""

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
            used[0] = True
            self.total, self.n = total or 0, initial or 0

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *exc: Any) -> bool:
            return False

        def update(self, n: int = 1) -> None:
            self.n += n
            if self.total and 0 <= self.n < self.total:
                on_progress(stage, self.n, self.total)

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
        from httpx2 import HTTPError
    except ImportError:  # another huggingface_hub release, another client
        return ()
    return HTTPError


def _commit_of(path: Path) -> str | None:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _download_error(error: BaseException, spec: ModelSpec, item: RepoFile, revision: str) -> Exception:
    """huggingface_hub's exceptions as one actionable line."""
    from huggingface_hub import errors

    repo, name, what = spec.hf_repo, item.repo_name, f"{item.repo_name} ({spec.name} {item.component})"
    if isinstance(error, errors.RevisionNotFoundError):
        return UsageError(f"--revision: {repo} has no revision '{revision}'; use a branch, tag or commit it has")
    if isinstance(error, errors.GatedRepoError):
        return WeightsError(f"weights: {repo} is gated: accept its licence on the hub, then set HF_TOKEN (or run "
                            f"`hf auth login`) and run the command again")
    if isinstance(error, errors.RepositoryNotFoundError) or (
            isinstance(error, errors.HfHubHTTPError) and getattr(error.response, "status_code", None) == 401):
        return WeightsError(f"weights: {repo} was not found or needs a token: check the model's hf_repo, set "
                            f"HF_TOKEN for a private repository, or check HF_ENDPOINT")
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return WeightsError(f"weights: {repo}@{revision} has no file {name} ({spec.name} {item.component}); "
                            f"check the model spec or --revision")
    if isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) and offline():
        return WeightsError(f"weights: {what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set (offline); "
                            f"unset it to download, or bring the files from another machine and run: "
                            f"{_import_hint(spec)}")
    cause = error
    while isinstance(cause, (ValueError, errors.LocalEntryNotFoundError)) and cause.__cause__ is not None:
        cause = cause.__cause__  # "Force download failed due to the above error." and friends wrap the real one
    return WeightsError(f"weights: downloading {what} from {_endpoint() or 'the Hugging Face hub'} failed "
                        f"({first_sentence(cause)}); nothing was kept under its name: check the network (or "
                        f"HF_ENDPOINT) and run the command again, or import the files: {_import_hint(spec)}")


def _fetch_locked(repo: str, repo_name: str, revision: str, locked: dict[str, Any] | None, *, force: bool,
                  is_offline: bool, stage: str, on_progress: ProgressCallback, label: str, fix: str,
                  on_error: Callable[[BaseException], Exception]) -> tuple[Path, str, int, bool]:
    """One file through `hf_hub_download` (into the Hugging Face cache, or found there), hashed and held to the
    lock — recorded when it has no entry yet: (path, sha256, size, downloaded now). `label` names the file in
    messages, `fix` is the command that re-fetches it, `on_error` turns a hub failure into the error to raise."""
    # Imported before the logger is quieted: huggingface_hub configures its logger when the module first loads.
    from huggingface_hub import hf_hub_download

    used = [False]
    try:
        with _quiet_hub_logger():
            pointer = hf_hub_download(repo, repo_name, revision=revision, cache_dir=hf_hub_cache(),
                                      force_download=force, local_files_only=is_offline, endpoint=_endpoint(),
                                      tqdm_class=_progress_bar(stage, on_progress, used))
    except (OSError, ValueError, ConnectionError, _http_errors()) as error:
        raise on_error(error) from error
    path = Path(pointer)
    digest = sha256_of(path)
    size = path.stat().st_size
    blob = path.resolve().name
    if _SHA256.fullmatch(blob) and blob != digest:  # LFS blobs are named by their sha256
        raise WeightsError(f"weights: {path} ({label}) does not match the sha256 the hub gives for it (corrupt); "
                           f"re-fetch it with: {fix}")
    if locked and locked.get("sha256") != digest:
        if used[0]:
            raise WeightsError(
                f"weights: {repo}@{revision} now serves a different {repo_name} than the one locked in "
                f"{lock_path(repo, revision)}; if the repository changed on purpose, delete that lock file and "
                f"download again, or pin --revision to the commit you locked")
        raise WeightsError(f"weights: {path} ({label}) no longer matches the sha256 locked in "
                           f"{lock_path(repo, revision)} (changed or corrupt); re-fetch it with: {fix}")
    if not locked:
        record_in_lock(repo, revision, repo_name, digest, size, "download", _commit_of(path))
    return path, digest, size, used[0]


def download(spec: ModelSpec, files: list[RepoFile], force: bool = False,
             on_progress: ProgressCallback | None = None) -> list[FileResult]:
    """Fetch files into the Hugging Face cache (or find them there, or in the import store), hash them, and hold
    them to the lock: the first download records a file; a later one must match it."""
    repo = require_repository(spec)
    revision = spec.hf_revision
    on_progress = on_progress or _no_progress
    is_offline = offline()
    if force and is_offline:
        raise WeightsError("--force: HF_HUB_OFFLINE is set, so nothing can be re-fetched; unset it, or bring intact "
                           f"files from another machine and run: {_import_hint(spec)}")
    results = []
    for item in files:
        stage = f"fetch {item.repo_name}"
        locked = read_lock(repo, revision).get(item.repo_name)
        stored = store_dir(repo, revision) / item.repo_name
        if stored.is_file():
            stored_sha = sha256_of(stored)
            if locked and locked.get("sha256") != stored_sha:
                if not force:
                    raise WeightsError(
                        f"weights: {stored} ({spec.name} {item.component}) no longer matches the sha256 locked in "
                        f"{lock_path(repo, revision)}; re-fetch it with: {fetch_command(spec, item.component)} --force")
                stored.unlink()  # a corrupt copy in maisi's own store: drop it, the download below replaces it
            elif not force:
                size = stored.stat().st_size
                on_progress(stage, size, size)
                results.append(FileResult(item.component, item.repo_name, item.kind, stored, "stored", stored_sha,
                                          size, "matches" if locked else None))
                continue
        path, digest, size, downloaded = _fetch_locked(
            repo, item.repo_name, revision, locked, force=force, is_offline=is_offline, stage=stage,
            on_progress=on_progress, label=f"{spec.name} {item.component}",
            fix=f"{fetch_command(spec, item.component)} --force",
            on_error=lambda error: _download_error(error, spec, item, revision))
        on_progress(stage, size, size)
        results.append(FileResult(item.component, item.repo_name, item.kind, path,
                                  "downloaded" if downloaded else "cached", digest, size,
                                  "matches" if locked else "recorded"))
    return results


# --- verify --------------------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    component: str
    repo_name: str
    kind: str
    where: str | None  # store | hf-cache | None (missing)
    path: Path | None
    status: str  # ok | mismatch | unlocked | missing
    sha256: str | None = None
    expected: str | None = None

    def document(self) -> dict[str, Any]:
        return {"component": self.component, "file": self.repo_name, "kind": self.kind, "where": self.where,
                "path": str(self.path) if self.path else None, "status": self.status, "sha256": self.sha256,
                "locked_sha256": self.expected}


def verify(spec: ModelSpec, files: list[RepoFile], on_progress: ProgressCallback | None = None,
           hashed: dict[Path, str] | None = None) -> list[CheckResult]:
    """Re-hash every copy maisi manages (import store, Hugging Face cache) and compare it with the lock.
    Nothing raises for a mismatch: see `mismatch_error`. `hashed` shares digests between calls (same run)."""
    repo = require_repository(spec)
    on_progress = on_progress or _no_progress
    hashed = {} if hashed is None else hashed
    lock = read_lock(repo, spec.hf_revision)
    results = []
    for item in files:
        copies = managed_copies(spec, item.repo_name)
        expected = (lock.get(item.repo_name) or {}).get("sha256")
        if not copies:  # with `expected`: locked, so it was fetched once, and is gone
            results.append(CheckResult(item.component, item.repo_name, item.kind, None, None, "missing", None,
                                       expected))
            continue
        for where, path in copies:
            key = path.resolve()
            if key not in hashed:
                hashed[key] = sha256_of(path, fresh=True)
            digest = hashed[key]
            status = "unlocked" if expected is None else ("ok" if digest == expected else "mismatch")
            results.append(CheckResult(item.component, item.repo_name, item.kind, where, path, status, digest,
                                       expected))
        on_progress(f"hash {item.repo_name}", 1, 1)
    return results


def locked_but_missing(results: list[CheckResult]) -> list[CheckResult]:
    """The files the lock holds (fetched once) of which maisi manages no copy any more."""
    return [r for r in results if r.status == "missing" and r.expected is not None]


def mismatch_error(spec: ModelSpec, results: list[CheckResult]) -> WeightsError | None:
    """One line naming the first file that does not match the lock and the command that re-fetches it, else the
    first locked file that is missing and the command that fetches it."""
    bad = [r for r in results if r.status == "mismatch"]
    if not bad:
        return missing_error(spec, results)
    first = bad[0]
    fix, more = fetch_fix(spec, bad)
    return WeightsError(
        f"weights: {first.path} ({spec.name} {first.component}) does not match the sha256 locked in "
        f"{lock_path(spec.hf_repo or '', spec.hf_revision)}{more}; re-fetch with: {fix} --force"
    )


def fetch_fix(spec: ModelSpec, rows: list[CheckResult]) -> tuple[str, str]:
    """(the command that fetches the files of `rows`, " (and N more)" when there are several) for an error line."""
    components = list(dict.fromkeys(r.component for r in rows))
    fix = "maisi weights download " + model_reference(spec) + "".join(f" --component {c}" for c in components)
    return fix, f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""


def missing_error(spec: ModelSpec, results: list[CheckResult]) -> WeightsError | None:
    gone = locked_but_missing(results)
    if not gone:
        return None
    first = gone[0]
    fix, more = fetch_fix(spec, gone)
    return WeightsError(
        f"weights: {first.repo_name} ({spec.name} {first.component}) is locked in "
        f"{lock_path(spec.hf_repo or '', spec.hf_revision)} but missing from maisi's store and the Hugging Face "
        f"cache{more}; fetch it with: {fix}"
    )


# --- import --------------------------------------------------------------------------------------------------------
def _copy_hashing(source: Path, temporary: Path, stage: str, on_progress: ProgressCallback) -> str:
    digest = hashlib.sha256()
    total = source.stat().st_size
    done = 0
    with open(source, "rb") as reader, open(temporary, "wb") as writer:
        for block in iter(lambda: reader.read(1 << 22), b""):
            digest.update(block)
            writer.write(block)
            done += len(block)
            if done < total:
                on_progress(stage, done, total)
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
    on_progress = on_progress or _no_progress
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
            stage = f"import {item.repo_name}"
            digest = _copy_hashing(source, temporary, stage, on_progress)
            expected = (lock.get(item.repo_name) or {}).get("sha256")
            if expected and expected != digest:
                raise WeightsError(
                    f"weights: {source} does not match the sha256 locked for {item.repo_name} in "
                    f"{lock_path(repo, revision)} (expected {expected[:12]}…, got {digest[:12]}…); nothing was "
                    f"imported: bring an intact copy")
            size = temporary.stat().st_size
            staged.append((item, temporary, digest, size))
            on_progress(stage, max(size, 1), max(size, 1))
        results = []
        for item, temporary, digest, size in staged:
            destination = target / item.repo_name
            os.replace(temporary, destination)
            remember_sha256(destination, digest)
            had_entry = item.repo_name in lock
            if not had_entry:
                record_in_lock(repo, revision, item.repo_name, digest, size, f"import from {folder}")
            results.append(FileResult(item.component, item.repo_name, item.kind, destination, "imported", digest,
                                      size, "matches" if had_entry else "recorded"))
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    missing = [f for f in files if f not in present]
    return results + [FileResult(f.component, f.repo_name, f.kind, None, "not in folder") for f in missing]


# --- where each file is --------------------------------------------------------------------------------------------
@dataclass
class Location:
    component: str
    repo_name: str
    kind: str
    path: Path | None
    source: str | None  # weights-dir | bundled | store | hf-cache | path | hand-placed (a HubFile under MAISI_HOME)
    size: int | None
    locked: bool

    def document(self) -> dict[str, Any]:
        return {"component": self.component, "file": self.repo_name, "kind": self.kind,
                "path": str(self.path) if self.path else None, "where": self.source,
                "present": self.path is not None, "size": self.size, "locked": self.locked}


def locations(spec: ModelSpec, weights_dir: Path | None = None) -> list[Location]:
    """Where each repository file of a model would be read from (the order `generate` uses), or None."""
    from maisi_cli.engine.weights import locate_file

    lock = read_lock(spec.hf_repo, spec.hf_revision) if spec.hf_repo else {}
    found = []
    for item in repo_files(spec):
        hit = locate_file(spec, item.repo_name, weights_dir)
        path, source = hit if hit else (None, None)
        found.append(Location(item.component, item.repo_name, item.kind, path, source,
                              path.stat().st_size if path else None, item.repo_name in lock))
    return found


# --- single files outside a model spec (feature extractors for `maisi fid`) ---------------------------------------
@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face repository that belongs to no model spec, fetched by
    `maisi weights download NAME` and locked like a model's files."""

    name: str  # what `maisi weights download` takes
    hf_repo: str
    filename: str
    revision: str = "main"
    licence: str | None = None
    what: str = ""


# The published RadImageNet ResNet-50 (no top) in the state-dict layout of `Warvito/radimagenet-models`, the network
# the reference FID script loads through torch.hub (which fetches it from Google Drive with gdown). MONAI hosts the
# same layout on the Hugging Face hub for its perceptual loss (`Project-MONAI/perceptual-models`, which downloads
# `MONAI/checkpoints/RadImageNet-ResNet50_notop.pth` with hf_hub_download); maisi fetches it from there.
EXTRACTOR_FILES = {
    "radimagenet-resnet50": HubFile(
        name="radimagenet-resnet50", hf_repo="MONAI/checkpoints", filename="RadImageNet-ResNet50_notop.pth",
        licence="see the Hugging Face repository MONAI/checkpoints and the RadImageNet terms (radimagenet.com)",
        what="RadImageNet ResNet-50 feature extractor for `maisi fid`"),
}


def extractor_file(name: str) -> HubFile | None:
    return EXTRACTOR_FILES.get(name.strip().lower())


def hub_files(name: str | None = None, revision: str | None = None) -> list[HubFile]:
    """The HubFiles `maisi weights list|path|verify` show: every one (no name), the one named, or none (a model's
    name); at `revision` when one is given (`--revision`)."""
    if name is None:
        chosen = list(EXTRACTOR_FILES.values())
    else:
        item = extractor_file(name)
        chosen = [item] if item is not None else []
    return [replace(item, revision=revision) if revision else item for item in chosen]


def hand_placed_path(item: HubFile) -> Path:
    """Where a copy brought by hand goes (`maisi fid` looks there before the Hugging Face cache)."""
    return maisi_home() / "fid" / item.filename


def hub_file_in_cache(item: HubFile, revision: str | None = None) -> Path | None:
    """The file in the Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(item.hf_repo, item.filename, revision=revision or item.revision,
                                    cache_dir=hf_hub_cache())
    return Path(cached) if isinstance(cached, str) else None


def locate_hub_file(item: HubFile) -> tuple[Path, str] | None:
    """(path, where) of the copy a HubFile is read from, or None: the copy brought by hand (`hand_placed_path`,
    not held to the lock) first, then the Hugging Face cache at the item's revision (held to the lock). The order
    `maisi fid` loads the extractor in (engine/fid.py `locate_radimagenet`)."""
    manual = hand_placed_path(item)
    if manual.is_file():
        return manual, "hand-placed"
    cached = hub_file_in_cache(item)
    return (cached, "hf-cache") if cached is not None else None


def hub_file_locations(item: HubFile) -> list[Location]:
    """`locations` for a HubFile: one entry, in the fields of a model's files (component = the HubFile's name)."""
    found = locate_hub_file(item)
    path, source = found if found else (None, None)
    locked = item.filename in read_lock(item.hf_repo, item.revision)
    return [Location(item.name, item.filename, "weights", path, source, path.stat().st_size if path else None,
                     locked)]


def verify_hub_file(item: HubFile, on_progress: ProgressCallback | None = None,
                    hashed: dict[Path, str] | None = None) -> list[CheckResult]:
    """`verify` for a HubFile: re-hash the Hugging Face cache copy (the one maisi manages; a copy brought by hand is
    the user's own, as a --weights-dir file) and compare it with the lock. See `hub_file_mismatch_error`."""
    on_progress = on_progress or _no_progress
    hashed = {} if hashed is None else hashed
    cached = hub_file_in_cache(item)
    expected = (read_lock(item.hf_repo, item.revision).get(item.filename) or {}).get("sha256")
    if cached is None:  # with `expected`: locked, so it was fetched once, and is gone
        return [CheckResult(item.name, item.filename, "weights", None, None, "missing", None, expected)]
    key = cached.resolve()
    if key not in hashed:
        hashed[key] = sha256_of(cached, fresh=True)
    digest = hashed[key]
    status = "unlocked" if expected is None else ("ok" if digest == expected else "mismatch")
    on_progress(f"hash {item.filename}", 1, 1)
    return [CheckResult(item.name, item.filename, "weights", "hf-cache", cached, status, digest, expected)]


def hub_file_fix(item: HubFile) -> str:
    """The command that re-fetches a HubFile."""
    pinned = f" --revision {item.revision}" if item.revision != EXTRACTOR_FILES.get(item.name, item).revision else ""
    return f"maisi weights download {item.name}{pinned} --force"


def hub_file_mismatch_error(item: HubFile, results: list[CheckResult]) -> WeightsError | None:
    """`mismatch_error` for a HubFile: one line naming the file and the command that re-fetches it (or fetches it,
    when it is locked but missing)."""
    bad = [r for r in results if r.status == "mismatch"]
    if not bad:
        if not locked_but_missing(results):
            return None
        return WeightsError(f"weights: {item.filename} ({item.name}) is locked in "
                            f"{lock_path(item.hf_repo, item.revision)} but missing from the Hugging Face cache; "
                            f"fetch it with: {hub_file_fix(item).removesuffix(' --force')}")
    return WeightsError(f"weights: {bad[0].path} ({item.name}) does not match the sha256 locked in "
                        f"{lock_path(item.hf_repo, item.revision)}; re-fetch with: {hub_file_fix(item)}")


def check_hub_file(item: HubFile, path: Path, revision: str | None = None) -> str:
    """sha256 of a copy in the Hugging Face cache, held to the lock (WeightsError naming the fix on a mismatch)."""
    revision = revision or item.revision
    digest = hash_file(path)  # afresh: a digest cached by mtime could vouch for changed bytes
    entry = read_lock(item.hf_repo, revision).get(item.filename)
    if entry and entry.get("sha256") != digest:
        raise WeightsError(f"weights: {path} ({item.name}) no longer matches the sha256 locked in "
                           f"{lock_path(item.hf_repo, revision)} (changed or corrupt); re-fetch it with: "
                           f"maisi weights download {item.name} --force")
    return digest


def _hub_file_error(error: BaseException, item: HubFile, revision: str, offline_hint: str) -> Exception:
    """huggingface_hub's exceptions, for a HubFile, as one actionable line."""
    from huggingface_hub import errors

    repo = item.hf_repo
    if isinstance(error, errors.RevisionNotFoundError):
        return UsageError(f"--revision: {repo} has no revision '{revision}'; use a branch, tag or commit it has")
    if isinstance(error, errors.GatedRepoError):
        return WeightsError(f"weights: {repo} is gated: accept its licence on the hub, then set HF_TOKEN and run "
                            "the command again")
    if isinstance(error, errors.RepositoryNotFoundError) or (
            isinstance(error, errors.HfHubHTTPError) and getattr(error.response, "status_code", None) == 401):
        return WeightsError(f"weights: {repo} was not found or needs a token: set HF_TOKEN or check HF_ENDPOINT")
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return WeightsError(f"weights: {repo}@{revision} has no file {item.filename}; check --revision")
    if isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) and offline():
        return WeightsError(f"weights: {item.filename} ({item.name}) is not in the Hugging Face cache and "
                            f"HF_HUB_OFFLINE is set (offline); unset it to download, or {offline_hint}")
    cause = error
    while isinstance(cause, (ValueError, errors.LocalEntryNotFoundError)) and cause.__cause__ is not None:
        cause = cause.__cause__
    source = _endpoint() or "the Hugging Face hub"
    return WeightsError(f"weights: downloading {item.filename} ({item.name}) from {source} "
                        f"failed ({first_sentence(cause)}); nothing was kept under its name: check the network (or "
                        f"HF_ENDPOINT) and run the command again, or {offline_hint}")


def download_hub_file(item: HubFile, revision: str | None = None, force: bool = False,
                      on_progress: ProgressCallback | None = None, offline_hint: str = "") -> FileResult:
    """Fetch one HubFile into the Hugging Face cache (or find it there), hash it and hold it to the lock, as
    `download` does for a model's files. `offline_hint` says how to bring the file without the hub."""
    revision = revision or item.revision
    on_progress = on_progress or _no_progress
    offline_hint = offline_hint or f"download {item.filename} on another machine"
    is_offline = offline()
    if force and is_offline:
        raise WeightsError(f"--force: HF_HUB_OFFLINE is set, so nothing can be re-fetched; unset it, or "
                           f"{offline_hint}")
    stage = f"fetch {item.filename}"
    locked = read_lock(item.hf_repo, revision).get(item.filename)
    path, digest, size, downloaded = _fetch_locked(
        item.hf_repo, item.filename, revision, locked, force=force, is_offline=is_offline, stage=stage,
        on_progress=on_progress, label=item.name, fix=f"maisi weights download {item.name} --force",
        on_error=lambda error: _hub_file_error(error, item, revision, offline_hint))
    on_progress(stage, size, size)
    return FileResult(item.name, item.filename, "weights", path, "downloaded" if downloaded else "cached", digest, size,
                      "matches" if locked else "recorded")
