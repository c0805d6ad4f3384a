"""The files of Hugging Face repositories on this machine: what one is (`RepoFile`), where its copies are, the sha256
lock that holds them, and the sha256 of files. Used by engine/weights.py (which reads the files) and engine/hub.py
(which fetches, verifies and imports them); no network here.

- Store: `MAISI_HOME/weights/<owner>--<name>/<revision>/` holds a model's files imported from a folder, under their
  repository names (`maisi weights import`).
- Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`): where downloads go; looked up here without network.
- Lock: `MAISI_HOME/locks/<owner>--<name>@<revision>.json` maps each repository file name to the sha256 and size it
  had when maisi first downloaded or imported it. Copies in the store or the cache are held to it.
- sha256: `hash_file` reads a file afresh; `sha256_of` remembers digests under MAISI_HOME by (path, size, mtime) for
  listing and fetching large checkpoints; nothing that loads weights uses the remembered ones.

Environment read at call time: `MAISI_HOME`, `HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Cheap: huggingface_hub loads its submodules on first use (attribute access at call time also lets tests stand in).
import huggingface_hub

from maisi_cli.config import maisi_home
from maisi_cli.errors import WeightsError
from maisi_cli.io.provenance import read_json, write_json
from maisi_cli.models import ModelSpec


@dataclass(frozen=True)
class RepoFile:
    """One file of a Hugging Face repository that maisi fetches into the Hugging Face cache, holds to the sha256 lock
    and finds on disk: a model's weight or data file (`spec` set; copies imported from a folder go to maisi's store),
    or a single file of no model, such as the `maisi fid` feature extractor (`spec` None; a copy brought by hand goes
    to `MAISI_HOME/<hand_placed_in>/`, is looked at first and, being the user's own, is not held to the lock)."""

    component: str  # a key of the spec's `weights` or `datasets`; a single file's name (`maisi weights download X`)
    repo_name: str  # the file's path inside the repository, e.g. models/autoencoder_v1.pt
    kind: str = "weights"  # "weights" or "datasets"
    repo: str | None = None  # owner/name on the hub; None for a model whose files ship with it or come from a folder
    revision: str = "main"
    spec: ModelSpec | None = field(default=None, repr=False, compare=False)
    hand_placed_in: str | None = None  # a single file: the folder under MAISI_HOME for a copy brought by hand
    licence: str | None = None  # a single file's licence (a model's is its spec's)
    pinned: bool = False  # a single file asked for at another revision than its own (`--revision`)

    @property
    def label(self) -> str:
        """How messages name the file: "rflow-ct autoencoder" for a model's, a single file's name."""
        return f"{self.spec.name} {self.component}" if self.spec is not None else self.component

    @property
    def stored(self) -> Path | None:
        """Where maisi's store keeps an imported copy of a model's file (whether one is there or not)."""
        if self.spec is None or not self.repo:
            return None
        return store_dir(self.repo, self.revision) / self.repo_name

    @property
    def hand_placed(self) -> Path | None:
        """Where a copy of a single file brought by hand goes."""
        return maisi_home() / self.hand_placed_in / self.repo_name if self.hand_placed_in else None


def model_files(spec: ModelSpec) -> list[RepoFile]:
    """Every repository file of a model: its weight files, then its data files."""
    return [RepoFile(component, name, kind, spec.hf_repo, spec.hf_revision, spec)
            for kind, names in (("weights", spec.weights), ("datasets", spec.datasets))
            for component, name in names.items()]


# --- commands named in messages ------------------------------------------------------------------------------------
def model_reference(spec: ModelSpec) -> str:
    """How to name the model on the command line: its name, or the spec file it was read from."""
    return spec.source if spec.source.endswith(".json") else spec.name


def fetch_command(spec: ModelSpec, component: str) -> str:
    """The command that downloads one file of a model."""
    return f"maisi weights download {model_reference(spec)} --component {component}"


def download_command(files: Sequence[RepoFile]) -> str:
    """The command that downloads `files` (of one model, or one single file): a model's components each named, a
    single file's revision when it is not its own."""
    first = files[0]
    if first.spec is None:
        return f"maisi weights download {first.component}" + (f" --revision {first.revision}" if first.pinned else "")
    components = dict.fromkeys(f.component for f in files)
    return f"maisi weights download {model_reference(first.spec)}" + "".join(f" --component {c}" for c in components)


# --- where copies are ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return text.replace("/", "--")


def lock_path(repo: str, revision: str) -> Path:
    return maisi_home() / "locks" / f"{_slug(repo)}@{_slug(revision)}.json"


def store_dir(repo: str, revision: str) -> Path:
    """maisi's import store for one repository revision; files keep their repository names below it."""
    return maisi_home() / "weights" / _slug(repo) / _slug(revision)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_file(item: RepoFile) -> Path | None:
    """The file in the Hugging Face cache at the item's revision, or None (no network)."""
    if not item.repo:
        return None
    cached = huggingface_hub.try_to_load_from_cache(item.repo, item.repo_name, revision=item.revision,
                                                    cache_dir=hf_hub_cache())
    return Path(cached) if isinstance(cached, str) else None


def managed_copies(item: RepoFile) -> Iterator[tuple[Path, str]]:
    """(path, where) of each copy maisi manages, in the order they are read: the store (a model's file), then the
    Hugging Face cache; the cache is only asked when the caller goes on past the store."""
    stored = item.stored
    if stored is not None and stored.is_file():
        yield stored, "store"
    cached = cached_file(item)
    if cached is not None:
        yield cached, "hf-cache"


# --- the lock ------------------------------------------------------------------------------------------------------
def read_lock(repo: str, revision: str) -> dict[str, dict[str, Any]]:
    """Repository file name → {"sha256", "size", …}; empty when nothing is locked yet."""
    document = read_json(lock_path(repo, revision)) or {}
    files = document.get("files")
    return files if isinstance(files, dict) else {}


def locked_sha256(item: RepoFile) -> str | None:
    """The sha256 the lock holds for the file, or None (not locked, or no repository)."""
    if not item.repo:
        return None
    return (read_lock(item.repo, item.revision).get(item.repo_name) or {}).get("sha256")


def record_in_lock(repo: str, revision: str, repo_name: str, sha256: str, size: int, source: str,
                   commit: str | None = None) -> None:
    """Add one file to the lock (written atomically). An existing entry is never replaced here."""
    path = lock_path(repo, revision)
    files = read_lock(repo, revision)
    if repo_name in files:
        return
    files[repo_name] = {
        "sha256": sha256, "size": size, "source": source, "commit": commit,
        "locked": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"repo": repo, "revision": revision, "files": dict(sorted(files.items()))})


def check_locked(item: RepoFile, path: Path, digest: str) -> None:
    """A copy whose file has an entry in the lock must match it, else a WeightsError naming the copy and the command
    that re-fetches it."""
    expected = locked_sha256(item)
    if expected and expected != digest:
        raise WeightsError(f"weights: {path} ({item.label}) no longer matches the sha256 locked in "
                           f"{lock_path(item.repo or '', item.revision)} (changed or corrupt); re-fetch it with: "
                           f"{download_command([item])} --force")


def held_to_lock(item: RepoFile, path: Path) -> str:
    """sha256 of a managed copy read afresh (a digest cached by mtime could vouch for changed bytes), held to the
    lock (`check_locked`)."""
    digest = hash_file(path)
    check_locked(item, path, digest)
    return digest


# --- sha256 of files -----------------------------------------------------------------------------------------------
def hash_file(path: Path) -> str:
    """sha256 of a file's bytes (no cache: `sha256_of` remembers large checkpoints)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sha256_cache_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_sha256_cache() -> dict[str, str]:
    try:
        return json.loads((maisi_home() / "sha256-cache.json").read_text())
    except (OSError, ValueError):
        return {}


def remember_sha256(path: Path, digest: str) -> None:
    """Record a digest computed elsewhere (e.g. while copying) so `sha256_of` need not re-read the file."""
    cache_file = maisi_home() / "sha256-cache.json"
    cache = _read_sha256_cache()
    cache[_sha256_cache_key(path)] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, cache_file)
    except OSError:
        pass  # a read-only home only costs re-hashing


def sha256_of(path: Path, fresh: bool = False) -> str:
    """sha256 of a file, remembered under MAISI_HOME by (path, size, mtime) so listing and fetching large checkpoints
    hash them once. `fresh=True` reads the file again whatever the cache says (`maisi weights verify`). Nothing that
    loads weights uses this cache: a file rewritten with its mtime put back would keep its old digest here."""
    key = _sha256_cache_key(path)
    if not fresh:
        cached = _read_sha256_cache().get(key)
        if cached:
            return cached
    digest = hash_file(path)
    remember_sha256(path, digest)
    return digest
