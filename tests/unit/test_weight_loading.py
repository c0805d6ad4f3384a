"""engine/weights.py loads what it hashed: one read per file, the digest of those bytes, the lock checked before
torch.load; a checkpoint's scale_factor must be one number; models.py types every network-block value."""

from __future__ import annotations

import builtins
import copy
import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch

from maisi_cli.engine import hub, store, weights
from maisi_cli.engine.networks import build_network
from maisi_cli.engine.store import sha256_of
from maisi_cli.engine.weights import WeightFile, load_verified, read_hashed, save_released_checkpoint
from maisi_cli.errors import UsageError, WeightsError
from maisi_cli.models import ALLOWED_TARGETS, PARAMETERS, ModelSpec, get_model
from tests.helpers import fill_random, tiny_spec_document


@pytest.fixture
def spec(tiny_spec_path) -> ModelSpec:
    return get_model(str(tiny_spec_path))


KEEP = object()


def saved_unet(spec: ModelSpec, path: Path, seed: int = 0, scale_factor=KEEP) -> Path:
    """A random tiny UNet in the released layout (scale_factor 0.8, or `scale_factor` put in its place)."""
    network = build_network(spec, "diffusion_unet")
    fill_random(network, seed)
    save_released_checkpoint(network, "diffusion_unet", path, scale_factor=0.8)
    if scale_factor is not KEEP:
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["scale_factor"] = scale_factor
        torch.save(checkpoint, path)
    return path


def rewrite_keeping_size_and_mtime(path: Path, payload: bytes) -> None:
    stat = path.stat()
    assert len(payload) == stat.st_size
    path.write_bytes(payload)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_read_hashed_gives_the_bytes_it_hashed_block_by_block(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "READ_BLOCK", 7)  # many blocks and a short last one
    payload = os.urandom(1000)
    (tmp_path / "f").write_bytes(payload)
    data, digest = read_hashed(tmp_path / "f")
    assert data.getvalue() == payload and data.tell() == 0
    assert digest == hashlib.sha256(payload).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert read_hashed(tmp_path / "empty")[1] == hashlib.sha256(b"").hexdigest()
    with pytest.raises(WeightsError, match="weights: .*missing.pt cannot be read"):
        read_hashed(tmp_path / "missing.pt")


def test_load_verified_reads_once_and_torch_loads_the_hashed_bytes(spec, tmp_path, monkeypatch):
    path = saved_unet(spec, tmp_path / "unet.pt")
    opened, loaded_from = [], []
    real_open, real_load = builtins.open, torch.load

    def counting_open(file, *args, **kwargs):
        if Path(str(file)) == path:
            opened.append(file)
        return real_open(file, *args, **kwargs)

    def spying_load(source, *args, **kwargs):
        assert kwargs.get("weights_only") is True
        loaded_from.append(hashlib.sha256(source.getvalue()).hexdigest())
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(torch, "load", spying_load)
    network = build_network(spec, "diffusion_unet")
    result = load_verified(network, WeightFile("diffusion_unet", "models/unet.pt", path, "weights-dir"), spec)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(opened) == 1 and loaded_from == [digest] and result.sha256 == digest
    assert result.extras["scale_factor"].shape == () and result.extras["scale_factor"].item() == pytest.approx(0.8)
    expected = real_load(path, weights_only=True)["unet_state_dict"]
    assert all(torch.equal(value, expected[key]) for key, value in network.state_dict().items())


def test_the_digest_cache_cannot_vouch_for_a_load(spec, tmp_path):
    path = saved_unet(spec, tmp_path / "unet.pt")
    old = sha256_of(path)  # remembered under MAISI_HOME by path, size and mtime
    changed = saved_unet(spec, tmp_path / "other.pt", seed=1).read_bytes()
    rewrite_keeping_size_and_mtime(path, changed)
    new = hashlib.sha256(changed).hexdigest()
    assert new != old and sha256_of(path) == old  # the listing cache is fooled, as designed for listings only
    weight = WeightFile("diffusion_unet", "models/unet.pt", path, "weights-dir")
    assert load_verified(build_network(spec, "diffusion_unet"), weight, spec).sha256 == new


def test_a_locked_store_file_is_refused_before_torch_load_sees_it(spec, tmp_path, monkeypatch):
    repo_name = spec.weights["diffusion_unet"]
    stored = saved_unet(spec, store.store_dir(spec.hf_repo, spec.hf_revision) / repo_name)
    original = stored.read_bytes()
    store.record_in_lock(spec.hf_repo, spec.hf_revision, repo_name, hashlib.sha256(original).hexdigest(),
                       len(original), "import")
    sha256_of(stored)
    rewrite_keeping_size_and_mtime(stored, saved_unet(spec, tmp_path / "other.pt", seed=1).read_bytes())
    weight = weights.locate_weight(spec, "diffusion_unet", None)
    assert weight.source == "store"

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran on bytes that failed the lock")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(WeightsError, match=f"weights: {stored} .* no longer matches the sha256 locked in .*; re-fetch "
                                           f"it with: maisi weights download .* --component diffusion_unet --force$"):
        load_verified(build_network(spec, "diffusion_unet"), weight, spec)


@pytest.mark.parametrize("value", ["x", [0.8, 0.9], torch.ones(2), True, float("nan"), None])
def test_a_scale_factor_that_is_not_one_number_is_refused(spec, tmp_path, value):
    path = saved_unet(spec, tmp_path / "unet.pt", scale_factor=value)
    weight = WeightFile("diffusion_unet", "models/unet.pt", path, "weights-dir")
    with pytest.raises(WeightsError, match=f"^weights: {path} has a 'scale_factor' of .*, not (one|a finite) "
                                           "number; diffusion_unet checkpoints carry"):
        load_verified(build_network(spec, "diffusion_unet"), weight, spec)


def test_monai_parameters_table_matches_the_classes():
    for target in ALLOWED_TARGETS:
        module, name = target.rsplit(".", 1)
        signature = inspect.signature(getattr(importlib.import_module(module), name).__init__)
        parameters = set(signature.parameters) - {"self", "schedule_args"}
        if name == "DDPMScheduler":  # its beta range comes through **schedule_args
            parameters |= {"beta_start", "beta_end"}
        assert PARAMETERS[name] == parameters, name


@pytest.mark.parametrize(("block", "key", "value", "field", "words"), [
    ("diffusion_unet_def", "attention_levels", [False], "diffusion_unet_def.attention_levels", "one per level"),
    ("autoencoder_def", "norm_num_groups", 7, "autoencoder_def.norm_num_groups", "does not divide"),
    ("controlnet_def", "bogus", 1, "controlnet_def.bogus", "not a parameter of MONAI's ControlNetMaisi"),
    ("diffusion_unet_def", "in_channels", "@include_body_region", "diffusion_unet_def.in_channels",
     "@include_body_region = False is not a whole number"),
    ("diffusion_unet_def", "out_channels", "@nowhere", "diffusion_unet_def.out_channels", "names no top-level"),
    ("diffusion_unet_def", "include_spacing_input", "yes", "diffusion_unet_def.include_spacing_input",
     "'yes' is not true or false"),
    (None, "mask_generation_latent_shape", [4, 64, 64], "mask_generation_latent_shape", "four whole numbers"),
])
def test_network_values_are_typed_when_the_spec_is_read(tmp_path, block, key, value, field, words):
    document = copy.deepcopy(tiny_spec_document("rflow", mask_generator=True))
    (document["network"][block] if block else document["network"])[key] = value
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(document))
    with pytest.raises(UsageError) as caught:
        get_model(str(path))
    message = str(caught.value)
    assert message.startswith(f"--model: '{path}' field 'network.{field}': ") and words in message, message
    assert "\n" not in message


class NotATensor:
    """Pickled by torch.save as a Python object: weights_only=True refuses it."""


@pytest.mark.parametrize(("payload", "words"), [
    (b"not a checkpoint at all", "is not a readable PyTorch checkpoint .*; fetch it again$"),
    ({"unet_state_dict": {}, "scale_factor": 1.0, "note": NotATensor()}, "holds pickled Python objects"),
    ({"state_dict": {}}, "is not a tiny-rflow diffusion_unet checkpoint: it has no 'unet_state_dict' entry"),
    ({"unet_state_dict": {"x": torch.zeros(1)}, "scale_factor": 1.0}, "does not fit tiny-rflow diffusion_unet: keys"),
])
def test_load_verified_keeps_the_existing_messages(spec, tmp_path, payload, words):
    path = tmp_path / "unet.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    weight = WeightFile("diffusion_unet", "models/unet.pt", path, "weights-dir")
    with pytest.raises(WeightsError, match=words):
        load_verified(build_network(spec, "diffusion_unet"), weight, spec)


def test_the_fid_extractor_is_held_to_its_lock_by_its_bytes_not_a_cached_digest(tmp_path):
    """A locked RadImageNet copy rewritten with its size and mtime kept: the digest cache (keyed by path, size and
    mtime) would still vouch for it; the check reads the bytes."""
    item = hub.EXTRACTOR_FILES["radimagenet-resnet50"]
    path = tmp_path / item.repo_name
    path.write_bytes(b"A" * 4096)
    store.record_in_lock(item.repo, item.revision, item.repo_name, hashlib.sha256(b"A" * 4096).hexdigest(), 4096,
                       "test")
    assert store.held_to_lock(item, path) == sha256_of(path)  # primes the cache
    stat = path.stat()
    path.write_bytes(b"B" * 4096)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(WeightsError, match="no longer matches the sha256 locked"):
        store.held_to_lock(item, path)


def test_built_and_read_reads_and_hashes_in_another_thread_while_building(tmp_path, monkeypatch):
    """The file's bytes and sha256 come from a second thread, so the hash overlaps the network's construction."""
    import threading

    path = tmp_path / "weights.pt"
    path.write_bytes(b"checkpoint bytes")
    threads = {}
    real_read_hashed = weights.read_hashed

    def read_hashed(where):
        threads["read"] = threading.current_thread()
        return real_read_hashed(where)

    def build():
        threads["build"] = threading.current_thread()
        return "network"

    monkeypatch.setattr(weights, "read_hashed", read_hashed)
    network, (data, digest) = weights.built_and_read(build, WeightFile("autoencoder", "x.pt", path))
    assert network == "network" and data.getvalue() == b"checkpoint bytes"
    assert digest == hashlib.sha256(b"checkpoint bytes").hexdigest()
    assert threads["build"] is threading.main_thread() and threads["read"] is not threading.main_thread()
