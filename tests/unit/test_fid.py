"""maisi_cli.engine.fid: the Fréchet distance (against NumPy/SciPy and MONAI), the extractor's key layout, the
feature cache, input listing. A tiny-width ResNet-50 (width 8) keeps forwards fast; the real width is only built
and saved once per session to check the key layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.linalg
import torch

from maisi_cli.engine import fid as fid_engine
from maisi_cli.engine.fid import (FidError, FidSettings, RadImageNetResNet50, compute_fid, frechet_distance,
                                  list_volumes, load_extractor, plane_slices, radimagenet_normalise)
from maisi_cli.errors import UsageError, WeightsError


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID, written independently of the engine."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = (a - mu1).T @ (a - mu1) / (len(a) - 1)
    s2 = (b - mu2).T @ (b - mu2) / (len(b) - 1)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 8)), rng.normal(0.5, 1.3, size=(50, 8))


def test_identical_sets_give_zero(features):
    a, _ = features
    assert abs(frechet_distance(a, a)) < 1e-6


def test_symmetric(features):
    a, b = features
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9, abs=1e-9)


def test_matches_independent_numpy(features):
    a, b = features
    assert frechet_distance(a, b) == pytest.approx(reference_fid(a, b), rel=1e-9)


def test_matches_monai_fid_metric(features):
    from monai.metrics import FIDMetric

    a, b = features
    expected = float(FIDMetric()(torch.from_numpy(b), torch.from_numpy(a)))
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def small_side_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID for fewer samples than features, written independently of the engine: with centred, scaled data
    X_a, X_b (sigma = X.T @ X), tr(sqrt(sigma_a @ sigma_b)) is the sum of the singular values of X_a @ X_b.T."""
    xa = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    xb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum()
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + (xa**2).sum() + (xb**2).sum() - 2 * cross)


def test_identical_sets_with_fewer_samples_than_features_give_zero():
    """`maisi fid A A` with 20 slices of 256 features gave a negative FID (sqrtm of a singular product)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20, 256)) * rng.uniform(0.01, 3.0, size=256)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a.astype(np.float32), a.astype(np.float32))) < 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_fewer_samples_than_features_is_non_negative_and_exact(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(12, 64)) * rng.uniform(0.01, 3.0, size=64)
    b = rng.normal(0.1, 1.0, size=(9, 64)) * rng.uniform(0.01, 3.0, size=64)
    distance = frechet_distance(a, b)
    assert distance >= 0
    assert distance == pytest.approx(small_side_fid(a, b), rel=1e-9)
    near = a + rng.normal(scale=1e-3, size=a.shape)  # nearly the same set: a small distance, still not below 0
    assert 0 <= frechet_distance(a, near) == pytest.approx(small_side_fid(a, near), abs=1e-6)


def test_non_finite_features_are_refused():
    a = np.ones((4, 3))
    a[1, 1] = np.nan
    with pytest.raises(FidError, match="non-finite features"):
        frechet_distance(a, np.ones((4, 3)))


def test_too_few_features_refused():
    with pytest.raises(FidError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))


# --- extractor ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def full_extractor_file(tmp_path_factory) -> Path:
    """A random full-width RadImageNet ResNet-50 (~94 MB), saved once per session."""
    path = tmp_path_factory.mktemp("fid-full") / "RadImageNet-ResNet50_notop.pth"
    torch.save(RadImageNetResNet50().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_extractor_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid-tiny") / "tiny-resnet50.pth"
    torch.save(RadImageNetResNet50(width=8).state_dict(), path)
    return path


def test_full_extractor_has_radimagenet_layout(full_extractor_file):
    state = torch.load(full_extractor_file, weights_only=True)
    for key in ("conv1.weight", "conv1.bias", "bn1.running_mean", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.bias", "layer4.2.conv3.bias", "layer4.2.bn3.running_var"):
        assert key in state
    assert [k for k in state if k.startswith("layer")][-1].startswith("layer4.2.")
    assert {k.split(".")[1] for k in state if k.startswith("layer3.")} == {str(i) for i in range(6)}
    assert not any(k.startswith("fc.") for k in state)
    extractor = load_extractor(full_extractor_file)
    assert extractor.model.features == 2048
    assert extractor.model(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)


def test_wrong_checkpoint_names_first_bad_keys(tmp_path, tiny_extractor_file):
    state = torch.load(tiny_extractor_file, weights_only=True)
    state["fc.weight"] = torch.zeros(2, 2)
    del state["layer2.0.conv1.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError) as caught:
        load_extractor(bad)
    message = str(caught.value)
    assert "missing keys layer2.0.conv1.bias" in message and "unexpected keys fc.weight" in message
    assert "\n" not in message


def test_missing_extractor_says_where_to_put_it():
    with pytest.raises(WeightsError) as caught:
        load_extractor(None)
    assert "RadImageNet-ResNet50_notop.pth" in str(caught.value) and "--extractor" in str(caught.value)
    assert "\n" not in str(caught.value)


# --- preprocessing, cache -----------------------------------------------------------------------------------------
def write_volumes(folder: Path, count: int, seed: int, shape=(20, 18, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        data = rng.normal(0, 300, size=shape).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), str(folder / f"v{i}.nii.gz"))
    return folder


def test_slicing_and_normalisation():
    volume = np.arange(10 * 6 * 4, dtype=np.float32).reshape(10, 6, 4)
    assert plane_slices(volume, "xy", None).shape == (4, 1, 10, 6)
    assert plane_slices(volume, "yz", 0.4).shape == (4, 1, 6, 4)  # [int(0.3*10), int(0.7*10)) = 3..6
    assert plane_slices(volume, "zx", None).shape == (6, 1, 10, 4)
    normalised = radimagenet_normalise(plane_slices(volume, "xy", None))
    assert normalised.shape == (4, 3, 10, 6)
    assert float(normalised[:, 0].min()) == pytest.approx(-0.406) and float(normalised[:, 2].max()) == \
        pytest.approx(1 - 0.485, abs=1e-6)


def test_cache_reused_and_invalidated(tmp_path, tiny_extractor_file):
    real = list_volumes(write_volumes(tmp_path / "real", 2, 1), "REAL")
    synth = list_volumes(write_volumes(tmp_path / "synth", 2, 2), "SYNTH")
    extractor = load_extractor(tiny_extractor_file)
    calls = []
    extractor.model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    settings = FidSettings(target_shape=(16, 16, 16), batch_size=5)
    first = compute_fid(real, synth, extractor, settings, cache_dir=tmp_path / "cache")
    assert calls and max(calls) <= 5 and first.computed == 12 and first.cached == 0
    calls.clear()
    second = compute_fid(real, synth, extractor, settings, cache_dir=tmp_path / "cache")
    assert calls == [] and second.cached == 12
    assert second.planes == pytest.approx(first.planes, rel=1e-12)
    # batch size does not change features; a changed shape or ratio misses the cache
    third = compute_fid(real, synth, extractor, FidSettings(target_shape=(16, 16, 16), batch_size=100))
    assert third.planes == pytest.approx(first.planes, rel=1e-4)
    compute_fid(real, synth, extractor, FidSettings(target_shape=(16, 16, 16), center_slices_ratio=0.5,
                                                    planes=("xy",)), cache_dir=tmp_path / "cache")
    assert calls  # recomputed
    assert first.features == 256 and first.real_slices == {"xy": 32, "yz": 32, "zx": 32}


def test_list_volumes_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FidError, match="holds no NIfTI"):
        list_volumes(tmp_path / "empty", "REAL")
    (tmp_path / "notes.png").write_bytes(b"x")
    with pytest.raises(FidError, match="not a folder, a datalist"):
        list_volumes(tmp_path / "notes.png", "REAL")
    write_volumes(tmp_path / "one", 1, 0)
    with pytest.raises(FidError, match="at least 2"):
        list_volumes(tmp_path / "one", "SYNTH")
    listing = tmp_path / "list.txt"
    listing.write_text("one/v0.nii.gz\nnotes.png\n")
    with pytest.raises(FidError, match="not a NIfTI"):
        list_volumes(listing, "REAL")


def test_unreadable_nifti_is_one_line(tmp_path, tiny_extractor_file):
    folder = write_volumes(tmp_path / "real", 2, 0)
    (folder / "v1.nii.gz").write_bytes(b"not a nifti")
    extractor = load_extractor(tiny_extractor_file)
    files = list_volumes(folder, "REAL")
    with pytest.raises(FidError) as caught:
        compute_fid(files, files, extractor, FidSettings(target_shape=None, planes=("xy",)))
    assert "v1.nii.gz" in str(caught.value) and "\n" not in str(caught.value)


def test_module_has_no_cli_imports():
    source = Path(fid_engine.__file__).read_text()
    assert "import typer" not in source and "import rich" not in source and "from rich" not in source


# --- datalists ------------------------------------------------------------------------------------------------------
def test_datalist_and_text_list_forms(tmp_path):
    folder = write_volumes(tmp_path / "data" / "vols", 3, 4)
    expected = sorted(folder.glob("*.nii.gz"))
    lists = tmp_path / "data"
    (lists / "monai.json").write_text('{"training": [{"image": "vols/v0.nii.gz", "label": "x"}, '
                                      '{"image": "vols/v1.nii.gz"}, {"image": "vols/v2.nii.gz"}]}')
    (lists / "plain.json").write_text(f'["vols/v0.nii.gz", {{"image": "vols/v1.nii.gz"}}, "{expected[2]}"]')
    (lists / "files.txt").write_text("# real volumes\nvols/v0.nii.gz\n\n  vols/v1.nii.gz  \n" f"{expected[2]}\n")
    for name in ("monai.json", "plain.json", "files.txt"):
        assert list_volumes(lists / name, "REAL") == expected, name


@pytest.mark.parametrize("content, error, fragment", [
    ("{not json", "UsageError", "is not valid JSON (line 1)"),
    ('{"validation": []}', "UsageError", 'must hold {"training"'),
    ('{"training": [{"label": "a.nii.gz"}]}', "UsageError", "item 0 has no image path"),
    ('["vols/v0.nii.gz", "vols/missing.nii.gz"]', "FidError", "missing.nii.gz' (listed in"),
    ('["vols/v0.nii.gz"]', "FidError", "has 1 volume(s); FID needs at least 2"),
])
def test_bad_datalists_are_one_line(tmp_path, content, error, fragment):
    write_volumes(tmp_path / "vols", 1, 4)
    (tmp_path / "list.json").write_text(content)
    with pytest.raises(Exception) as caught:
        list_volumes(tmp_path / "list.json", "SYNTH")
    assert type(caught.value).__name__ == error and fragment in str(caught.value)
    assert str(caught.value).startswith("SYNTH: ") and "\n" not in str(caught.value)


# --- extractor plugins (entry-point group maisi.extractors) ---------------------------------------------------------
class ToyNet(torch.nn.Module):
    """A 1-channel toy extractor: 2×2 average pooling → 4 features."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) * self.scale


def toy_normalise(slices: torch.Tensor) -> torch.Tensor:
    return slices.float() / 1000.0


def toy_factory(weights):
    return fid_engine.Extractor(model=ToyNet(), sha256="toy-v1", path=weights, normalise=toy_normalise)


def broken_factory(weights):
    raise RuntimeError("cannot find my weights")


def not_an_extractor(weights):
    return torch.nn.Linear(2, 2)


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Entry points read anew in the test (none cached by another) and all let in (MAISI_LOAD_PLUGINS unset)."""
    from maisi_cli import plugins

    monkeypatch.delenv("MAISI_LOAD_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def install_plugins(monkeypatch, **plugins: str) -> list:
    """Fake installed plugins: importlib.metadata.entry_points answers these for the group (and records calls)."""
    import importlib.metadata

    calls = []
    points = [importlib.metadata.EntryPoint(name, value, fid_engine.EXTRACTOR_GROUP) for name, value in plugins.items()]

    def entry_points(**params):
        calls.append(params)
        assert params == {"group": fid_engine.EXTRACTOR_GROUP}
        return points

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return calls


def test_plugin_extractor_is_found_loaded_lazily_and_used(tmp_path, monkeypatch, tiny_extractor_file, fresh_plugins):
    import sys

    calls = install_plugins(monkeypatch, toy="tests.unit.test_fid:toy_factory",
                            broken="maisi_no_such_plugin_module:make")
    assert fid_engine.extractor_names() == ["radimagenet-resnet50", "broken", "toy"]
    assert "maisi_no_such_plugin_module" not in sys.modules
    extractor = fid_engine.resolve_extractor("Toy", tmp_path / "w.bin")
    assert extractor.name == "toy" and extractor.path == tmp_path / "w.bin" and not extractor.model.training
    real = list_volumes(write_volumes(tmp_path / "real", 2, 1), "REAL")
    synth = list_volumes(write_volumes(tmp_path / "synth", 2, 2), "SYNTH")
    settings = FidSettings(target_shape=(16, 16, 16), planes=("xy",))
    report = compute_fid(real, synth, extractor, settings, cache_dir=tmp_path / "cache")
    assert report.features == 4 and report.extractor.startswith("toy (")
    # the built-in never lists or imports plugins; a plugin's features never share cache entries with it
    calls.clear()
    builtin = fid_engine.resolve_extractor("radimagenet-resnet50", tiny_extractor_file)
    assert calls == [] and builtin.name == "radimagenet-resnet50"
    assert compute_fid(real, synth, builtin, settings, cache_dir=tmp_path / "cache").cached == 0


def test_broken_plugins_fail_alone(tmp_path, monkeypatch, tiny_extractor_file, fresh_plugins):
    install_plugins(monkeypatch, broken="maisi_no_such_plugin_module:make",
                    failing="tests.unit.test_fid:broken_factory", wrong="tests.unit.test_fid:not_an_extractor",
                    **{"radimagenet-resnet50": "tests.unit.test_fid:toy_factory"})
    warnings_seen: list[str] = []
    with pytest.raises(FidError) as caught:
        fid_engine.resolve_extractor("broken", None, warnings_seen.append)
    message = str(caught.value)
    assert message.startswith("--extractor-name: the plugin 'broken' (maisi_no_such_plugin_module:make) failed to "
                              "load (ModuleNotFoundError") and "\n" not in message
    assert warnings_seen == ["--extractor-name: the plugin 'tests.unit.test_fid:toy_factory' registers the built-in "
                             "name 'radimagenet-resnet50'; ignored"]
    with pytest.raises(FidError, match=r"'failing' .* failed to load \(RuntimeError: cannot find my weights\)"):
        fid_engine.resolve_extractor("failing", None)
    with pytest.raises(FidError, match="returned Linear, not a maisi_cli.engine.fid.Extractor"):
        fid_engine.resolve_extractor("wrong", None)
    with pytest.raises(UsageError, match="no extractor 'nope'; installed: radimagenet-resnet50, broken, failing, "
                                         "wrong") as unknown:
        fid_engine.resolve_extractor("nope", None)
    assert unknown.value.exit_code == 2
    # the built-in name always means the built-in network
    assert isinstance(fid_engine.resolve_extractor("radimagenet-resnet50", tiny_extractor_file).model,
                      RadImageNetResNet50)


def test_unreadable_plugin_metadata_is_one_warning(monkeypatch, fresh_plugins):
    import importlib.metadata

    def entry_points(**params):
        raise ValueError("bad METADATA in some-dist")

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    seen: list[str] = []
    assert fid_engine.extractor_names(seen.append) == ["radimagenet-resnet50"]
    assert len(seen) == 1 and "could not list the 'maisi.extractors' plugins (ValueError" in seen[0]


# --- the published checkpoint: download into the Hugging Face cache, lock, use --------------------------------------
def test_downloaded_extractor_is_locked_and_used_without_extractor(tmp_path, monkeypatch, tiny_extractor_file):
    import hashlib

    import huggingface_hub

    from maisi_cli.engine import hub, store
    from tests.unit.test_hub import put_in_hf_cache

    item = hub.extractor_file("radimagenet-resnet50")
    assert (item.repo, item.repo_name) == ("MONAI/checkpoints", "RadImageNet-ResNet50_notop.pth")
    payload = tiny_extractor_file.read_bytes()
    calls = []

    def fake_download(repo, filename, **kwargs):
        calls.append((repo, filename, kwargs))
        return str(put_in_hf_cache(tmp_path, repo, filename, payload))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(WeightsError) as missing:
        load_extractor(None)
    assert "run `maisi weights download radimagenet-resnet50`" in str(missing.value)
    assert str(fid_engine.default_extractor_path()) in str(missing.value)

    (result,) = hub.download([item])
    digest = hashlib.sha256(payload).hexdigest()
    assert calls[-1][:2] == ("MONAI/checkpoints", "RadImageNet-ResNet50_notop.pth")
    assert calls[-1][2]["local_files_only"] is False and result.lock == "recorded" and result.sha256 == digest
    assert store.read_lock("MONAI/checkpoints", "main")["RadImageNet-ResNet50_notop.pth"]["sha256"] == digest
    assert hub.download([item])[0].lock == "matches"

    extractor = load_extractor(None)  # found in the Hugging Face cache, held to the lock
    assert extractor.path == store.cached_file(item) and extractor.sha256 == digest
    assert extractor.model.width == 8
    # a copy put by hand under MAISI_HOME wins
    own = fid_engine.default_extractor_path()
    own.parent.mkdir(parents=True)
    own.write_bytes(payload)
    assert load_extractor(None).path == own
    own.unlink()
    # a changed cache copy is refused with the command that repairs it
    extractor.path.resolve().write_bytes(payload + b"x")
    with pytest.raises(WeightsError, match="no longer matches the sha256 locked in .*maisi weights download "
                                           "radimagenet-resnet50 --force$"):
        load_extractor(None)


def test_offline_without_an_extractor_says_where_to_put_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as caught:
        load_extractor(None)
    message = str(caught.value)
    assert "HF_HUB_OFFLINE is set" in message and "maisi weights download radimagenet-resnet50" in message
    assert f"to '{fid_engine.default_extractor_path()}'" in message and "\n" not in message
