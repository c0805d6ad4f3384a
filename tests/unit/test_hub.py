"""engine/hub.py, engine/store.py and the lock-related parts of engine/weights.py, in process and without a network:
which files, where they are found, the sha256 lock, import, verify, and how hub failures read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from maisi_cli.engine import hub, store
from maisi_cli.engine.store import hash_file
from maisi_cli.engine.weights import WeightFile, check_lock, locate_file, locate_weight
from maisi_cli.errors import UsageError, WeightsError
from maisi_cli.models import get_model

COMMIT = "a" * 40


@pytest.fixture
def spec(tiny_spec_path, tmp_path):
    document = json.loads(tiny_spec_path.read_text())
    document["datasets"] = {"mask_database": "datasets/db.json"}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(document))
    return get_model(str(path))


@pytest.fixture
def payloads(spec):
    return {name: f"contents of {name}".encode() for name in [*spec.weights.values(), *spec.datasets.values()]}


def put_in_hf_cache(tmp_path: Path, repo: str, name: str, payload: bytes) -> Path:
    """The layout huggingface_hub writes: blobs named by sha256, snapshot links, refs/main."""
    root = tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"
    blob = root / "blobs" / hashlib.sha256(payload).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(payload)
    pointer = root / "snapshots" / COMMIT / name
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.exists():
        pointer.symlink_to(blob)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return pointer


def write_folder(folder: Path, payloads: dict[str, bytes]) -> Path:
    for name, payload in payloads.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(payload)
    return folder


def test_repo_files_picks_components_and_refuses_unknown_ones(spec):
    assert [f.kind for f in hub.repo_files(spec)] == ["weights"] * 3 + ["datasets"]
    assert [f.component for f in hub.repo_files(spec, models_only=True)] == list(spec.weights)
    assert [f.repo_name for f in hub.repo_files(spec, ["mask_database"])] == ["datasets/db.json"]
    with pytest.raises(UsageError, match="--component: model tiny-rflow has no file 'vae'") as caught:
        hub.repo_files(spec, ["vae"])
    assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match="--models-only"):
        hub.repo_files(spec, ["mask_database"], models_only=True)


def test_lock_and_store_paths_live_under_maisi_home(tmp_path):
    assert store.lock_path("nvidia/NV-Generate-CT", "main") == (
        tmp_path / "maisi-home" / "locks" / "nvidia--NV-Generate-CT@main.json")
    assert store.store_dir("nvidia/NV-Generate-CT", "refs/pr/1") == (
        tmp_path / "maisi-home" / "weights" / "nvidia--NV-Generate-CT" / "refs--pr--1")
    store.record_in_lock("o/r", "main", "models/a.pt", "1" * 64, 3, "download", COMMIT)
    store.record_in_lock("o/r", "main", "models/a.pt", "2" * 64, 3, "download")  # first record wins
    assert store.read_lock("o/r", "main")["models/a.pt"]["sha256"] == "1" * 64
    assert store.read_lock("o/r", "other") == {}


def test_locate_order_weights_dir_then_store_then_cache(spec, payloads, tmp_path, monkeypatch):
    name = spec.weights["autoencoder"]
    with pytest.raises(WeightsError, match=f"fetch it with: maisi weights download {spec.source} --component "
                                           "autoencoder$"):
        locate_weight(spec, "autoencoder", None)
    cached = put_in_hf_cache(tmp_path, spec.hf_repo, name, payloads[name])
    assert locate_weight(spec, "autoencoder", None) == WeightFile("autoencoder", name, cached, "hf-cache")
    stored = store.store_dir(spec.hf_repo, spec.hf_revision) / name
    write_folder(store.store_dir(spec.hf_repo, spec.hf_revision), {name: payloads[name]})
    assert locate_weight(spec, "autoencoder", None) == WeightFile("autoencoder", name, stored, "store")
    folder = write_folder(tmp_path / "mine", {name: b"my own"})
    monkeypatch.setenv("MAISI_WEIGHTS_DIR", str(folder))
    assert locate_weight(spec, "autoencoder", None).source == "weights-dir"
    with pytest.raises(WeightsError, match=f"missing in {folder}, in maisi's store and in the Hugging Face cache"):
        locate_weight(spec, "controlnet", None)
    # a --weights-dir folder that lacks a file falls through to the managed copies
    other = spec.weights["controlnet"]
    put_in_hf_cache(tmp_path, spec.hf_repo, other, payloads[other])
    assert locate_weight(spec, "controlnet", None).source == "hf-cache"


def test_the_lock_holds_managed_files_only(spec, payloads, tmp_path):
    """check_lock: a file from the Hugging Face cache with a lock entry must match it; a copy without an entry, or a
    file of the user's own folder under the same name, is used as it is."""
    name = spec.weights["diffusion_unet"]
    cached = put_in_hf_cache(tmp_path, spec.hf_repo, name, payloads[name])
    weight = locate_weight(spec, "diffusion_unet", None)
    digest = hashlib.sha256(payloads[name]).hexdigest()
    check_lock(weight, spec, hash_file(weight.path))  # no lock entry: hashed and used
    store.record_in_lock(spec.hf_repo, spec.hf_revision, name, digest, len(payloads[name]), "download")
    check_lock(weight, spec, hash_file(weight.path))
    cached.resolve().write_bytes(b"changed")
    with pytest.raises(WeightsError, match=f"no longer matches the sha256 locked in .*re-fetch it with: maisi "
                                           f"weights download {spec.source} --component diffusion_unet --force$"):
        check_lock(weight, spec, hash_file(weight.path))
    # the same repository name in a folder of the user's own is not held to the lock
    own = write_folder(tmp_path / "own", {name: b"trained here"})
    mine = locate_weight(spec, "diffusion_unet", own)
    assert mine.source == "weights-dir"
    check_lock(mine, spec, hash_file(mine.path))


def test_import_checks_every_file_before_placing_any(spec, payloads, tmp_path):
    folder = write_folder(tmp_path / "brought", payloads)
    name = spec.weights["controlnet"]
    store.record_in_lock(spec.hf_repo, spec.hf_revision, name, "0" * 64, 1, "download")
    with pytest.raises(WeightsError, match=f"{folder / name} does not match the sha256 locked"):
        hub.import_folder(folder, spec)
    imported = store.store_dir(spec.hf_repo, spec.hf_revision)
    assert not imported.exists() or not [p for p in imported.rglob("*") if p.is_file()]

    store.lock_path(spec.hf_repo, spec.hf_revision).unlink()
    stages = []
    results = hub.import_folder(folder, spec, lambda event: stages.append((event.label, event.done, event.total)))
    assert {r.status for r in results} == {"imported"} and {r.lock for r in results} == {"recorded"}
    assert sorted(p.relative_to(imported).as_posix() for p in imported.rglob("*") if p.is_file()) == sorted(payloads)
    lock = store.read_lock(spec.hf_repo, spec.hf_revision)
    assert {n: e["sha256"] for n, e in lock.items()} == {n: hashlib.sha256(p).hexdigest() for n, p in payloads.items()}
    assert [s for s in stages if s[1] == s[2]] == [(f"import {n}", len(p), len(p)) for n, p in payloads.items()]
    again = hub.import_folder(folder, spec)
    assert {r.lock for r in again} == {"matches"}

    with pytest.raises(WeightsError, match="holds none of tiny-rflow's files"):
        hub.import_folder(tmp_path, spec)
    with pytest.raises(UsageError, match="is not a folder"):
        hub.import_folder(tmp_path / "nope", spec)


def test_verify_reports_each_managed_copy(spec, payloads, tmp_path):
    name = spec.weights["autoencoder"]
    digest = hashlib.sha256(payloads[name]).hexdigest()
    put_in_hf_cache(tmp_path, spec.hf_repo, name, payloads[name])
    store.record_in_lock(spec.hf_repo, spec.hf_revision, name, digest, len(payloads[name]), "download")
    write_folder(store.store_dir(spec.hf_repo, spec.hf_revision), {name: b"not the same"})
    results = hub.verify(hub.repo_files(spec))
    by_where = {(r.repo_name, r.where): r.status for r in results}
    assert by_where[(name, "store")] == "mismatch" and by_where[(name, "hf-cache")] == "ok"
    assert by_where[(spec.weights["controlnet"], None)] == "missing"
    error = hub.mismatch_error(results)
    assert error is not None and str(error).endswith(
        f"re-fetch with: maisi weights download {spec.source} --component autoencoder --force")
    assert hub.mismatch_error([r for r in results if r.status != "mismatch"]) is None


def test_download_reads_offline_at_call_time_and_repairs_a_corrupt_store_copy(spec, payloads, tmp_path,
                                                                                monkeypatch):
    import huggingface_hub

    name = spec.weights["autoencoder"]
    calls = []

    def fake_download(repo, filename, **kwargs):
        calls.append(kwargs)
        return str(put_in_hf_cache(tmp_path, repo, filename, payloads[filename]))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    files = hub.repo_files(spec, ["autoencoder"])
    first = hub.download(files)
    assert first[0].lock == "recorded" and calls[-1]["local_files_only"] is False
    assert calls[-1]["cache_dir"] == tmp_path / "hf-home" / "hub"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download(files)[0].lock == "matches" and calls[-1]["local_files_only"] is True
    with pytest.raises(WeightsError, match="--force: HF_HUB_OFFLINE is set"):
        hub.download(files, force=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    stored = write_folder(store.store_dir(spec.hf_repo, spec.hf_revision), {name: b"corrupt"}) / name
    with pytest.raises(WeightsError, match="--component autoencoder --force$"):
        hub.download(files)
    repaired = hub.download(files, force=True)
    assert not stored.exists() and repaired[0].path.read_bytes() == payloads[name]
    assert calls[-1]["force_download"] is True


def test_hub_failures_read_as_one_actionable_line(spec, monkeypatch):
    import httpx2
    from huggingface_hub import errors

    item = hub.repo_files(spec, ["autoencoder"])[0]
    response = httpx2.Response(404, request=httpx2.Request("HEAD", "http://hub/x"))
    revision = hub._download_error(errors.RevisionNotFoundError("no", response=response), replace(item, revision="v9"))
    assert isinstance(revision, UsageError) and "--revision" in str(revision)
    entry = hub._download_error(errors.RemoteEntryNotFoundError("no", response=response), item)
    assert "has no file models/autoencoder_v1.pt" in str(entry)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = hub._download_error(errors.LocalEntryNotFoundError("x"), item)
    assert "offline" in str(offline) and f"maisi weights import DIR {spec.source}" in str(offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    wrapped = ValueError("Force download failed due to the above error.")
    wrapped.__cause__ = httpx2.ConnectError("All connection attempts failed")
    network = hub._download_error(wrapped, item)
    assert isinstance(network, WeightsError) and "(All connection attempts failed)" in str(network)
    assert "\n" not in str(network)


def test_hub_files_are_picked_by_name_and_revision(tmp_path):
    item = hub.extractor_file("radimagenet-resnet50")
    assert hub.extractor_files() == list(hub.EXTRACTOR_FILES.values())
    assert hub.extractor_files("RadImageNet-ResNet50") == [item]
    assert hub.extractor_files("rflow-ct") == [] and hub.extractor_files("nope") == []
    pinned = hub.extractor_files("radimagenet-resnet50", "v2")[0]
    assert pinned.revision == "v2" and pinned.repo_name == item.repo_name
    assert store.download_command([item]) == "maisi weights download radimagenet-resnet50"
    assert store.download_command([pinned]) == "maisi weights download radimagenet-resnet50 --revision v2"
    # nothing there: missing, unlocked, and verify says so without raising
    assert [(loc.path, loc.source, loc.locked) for loc in hub.locations([item])] == [(None, None, False)]
    results = hub.verify([item])
    assert [r.status for r in results] == ["missing"] and hub.mismatch_error(results) is None
    # an unlocked cache copy is hashed and reported, not refused
    payload = b"weights"
    path = put_in_hf_cache(tmp_path, item.repo, item.repo_name, payload)
    assert locate_file(item) == (path, "hf-cache")
    assert [(r.status, r.sha256) for r in hub.verify([item])] == [
        ("unlocked", hashlib.sha256(payload).hexdigest())]
    assert locate_file(pinned) is None  # another revision: not in the cache


def test_verify_refuses_a_locked_file_that_is_missing(spec, payloads, tmp_path):
    """A file the lock holds was fetched once: its copy gone is a failure naming the file and the fetch command,
    while a file never fetched (not locked) stays a plain "missing"."""
    name = spec.weights["autoencoder"]
    digest = hashlib.sha256(payloads[name]).hexdigest()
    store.record_in_lock(spec.hf_repo, spec.hf_revision, name, digest, len(payloads[name]), "download")
    results = hub.verify(hub.repo_files(spec))
    by_name = {r.repo_name: r for r in results}
    assert (by_name[name].status, by_name[name].expected) == ("missing", digest)
    assert by_name[spec.weights["controlnet"]].expected is None
    error = hub.mismatch_error(results)
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith(f"weights: {name} ({spec.name} autoencoder) is locked in ")
    assert str(error).endswith(f"fetch it with: maisi weights download {spec.source} --component autoencoder")
    assert hub.mismatch_error([by_name[spec.weights["controlnet"]]]) is None

    item = hub.extractor_file("radimagenet-resnet50")
    store.record_in_lock(item.repo, item.revision, item.repo_name, "3" * 64, 7, "download")
    checked = hub.verify([item])
    assert [(r.status, r.expected) for r in checked] == [("missing", "3" * 64)]
    gone = hub.mismatch_error(checked)
    assert gone is not None and item.repo_name in str(gone)
    assert str(gone).endswith("fetch it with: maisi weights download radimagenet-resnet50")
