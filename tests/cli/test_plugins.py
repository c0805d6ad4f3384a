"""Plugins through entry points: registered in-test as temporary distributions (a `*.dist-info` folder with
`METADATA` and `entry_points.txt` on sys.path), then driven through the CLI. Nothing is installed.

The last test checks the real `plugins/maisi-mr` distribution and runs only where it is installed (`.ci/run`)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maisi_cli import plugins
from maisi_cli.cli.plugins import plugin_records

REPO = Path(__file__).resolve().parents[2]
MR_PLUGIN = REPO / "plugins" / "maisi-mr"
runner = CliRunner()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`site(dist, entry_points, modules)` makes a distribution visible to importlib.metadata for this test."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    added_modules: list[str] = []

    def install(dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str] | None = None,
                version: str = "1.0") -> None:
        info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("".join(
            f"[maisi.{group}]\n" + "".join(f"{name} = {value}\n" for name, value in items.items()) + "\n"
            for group, items in entry_points.items()))
        for name, source in (modules or {}).items():
            (folder / f"{name}.py").write_text(source)
            added_modules.append(name)
        importlib.invalidate_caches()
        plugins.reset()

    yield install
    for name in added_modules:
        sys.modules.pop(name, None)
    plugins.reset()


@pytest.fixture
def fresh_app(monkeypatch: pytest.MonkeyPatch):
    """`fresh_app()`: the maisi app assembled again, so that it mounts the plugin commands visible now."""
    import maisi_cli.cli.app as app_module

    def assemble():
        return importlib.reload(app_module).app

    yield assemble
    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "")
    plugins.reset()
    importlib.reload(app_module)


def mr_plugin(site, dist: str = "maisi-mr-test") -> None:
    """The example plugin's package (plugins/maisi-mr on sys.path) behind a test distribution, all five groups."""
    site(dist, {group: {"mr": value} for group, value in (
        ("models", "maisi_mr:models"), ("modalities", "maisi_mr:MODALITIES"), ("labels", "maisi_mr:labels"),
        ("profiles", "maisi_mr:profiles"), ("commands", "maisi_mr.cli:app"))})


@pytest.fixture
def mr(site, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(MR_PLUGIN))
    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "maisi-mr-test")
    mr_plugin(site)


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Warning:")]


def invoke(app, *args: str):
    return runner.invoke(app, list(args))


def tiny_spec(tiny_model, name: str) -> dict:
    spec_path, _ = tiny_model
    return {**json.loads(spec_path.read_text()), "name": name, "aliases": []}


# --- the example plugin's content, through test distributions -------------------------------------------------------
def test_mr_models_appear_in_models_and_resolve(mr, fresh_app):
    app = fresh_app()
    result = invoke(app, "models", "--json")
    assert result.exit_code == 0, result.stderr
    by_name = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert {"rflow-ct", "rflow-mr", "rflow-mr-brain"} <= set(by_name)
    assert by_name["rflow-mr"]["hf_repo"] == "nvidia/NV-Generate-MR"
    assert {w["file"] for w in by_name["rflow-mr-brain"]["weights"]} == {
        "models/autoencoder_v1.pt", "models/diff_unet_3d_rflow-mr-brain_v1.pt"}
    assert warning_lines(result.stderr) == []

    from maisi_cli.models import get_model

    brain = get_model("rflow-mr-brain")
    assert brain.source == "plugin maisi-mr-test 1.0"
    assert brain.modality_id == 9  # mri_t1, as upstream's v1 config (test_mr_specs_match_upstream below)
    assert get_model("rflow-mr").modality_id == 9 and get_model("rflow-mr").default_spacing((128, 256, 256)) == (
        1.25, 1.0, 1.0)


def test_generate_dry_run_resolves_an_mr_model(mr, fresh_app, tmp_path, monkeypatch):
    """The model, its size rules and the profile resolve; weights missing → the exact fetch command; weights here →
    the plan of an image-only model (no MR ControlNet is released): no mask, guidance 15, MR intensities, no QC."""
    # a 256³ MR model decoded whole on the CPU needs ~34 GiB of host memory: without this the plan would depend on
    # the machine's free memory (the check itself is tested in tests/cli/test_bounds.py)
    monkeypatch.setenv("MAISI_SKIP_MEMORY_CHECK", "1")
    app = fresh_app()
    dry = invoke(app, "--json", "generate", "--model", "rflow-mr", "--device", "cpu", "--dry-run")
    assert dry.exit_code == 0, dry.stderr  # the plan, and what a run would download
    plan = json.loads(dry.stdout)["plan"]
    assert [d["component"] for d in plan["downloads"]] == ["autoencoder", "diffusion_unet"]
    assert plan["download_command"] == "maisi weights download rflow-mr"
    missing = invoke(app, "generate", "--model", "rflow-mr", "--device", "cpu")
    assert missing.exit_code == 1
    assert "— run `maisi weights download rflow-mr`" in missing.stderr and "nvidia/NV-Generate-MR" in missing.stderr

    rules = invoke(app, "generate", "--model", "rflow-mr", "--device", "cpu", "--size", "256x256x192", "--dry-run")
    assert rules.exit_code == 2 and "--size: one of 128x128x128" in rules.stderr, rules.stderr

    weights = tmp_path / "weights"
    for name in ("models/autoencoder_v2.pt", "models/diff_unet_3d_rflow-mr.pt"):
        (weights / name).parent.mkdir(parents=True, exist_ok=True)
        (weights / name).write_bytes(b"")
    found = invoke(app, "--json", "generate", "--model", "rflow-mr", "--device", "cpu", "--profile", "mr",
                   "--weights-dir", str(weights), "--dry-run")
    assert found.exit_code == 0, found.stderr
    plan = json.loads(found.stdout)["plan"]
    assert plan["mask"]["type"] == "none" and plan["image_only"] is True and plan["label_mode"] is None
    assert plan["guidance"] == 15.0 and plan["output_intensity"] == "mr"
    assert plan["size"] == [128, 256, 256] and plan["spacing"] == [1.25, 1.0, 1.0] and plan["profile"] == "mr"
    assert set(plan["weights"]) == {"autoencoder", "diffusion_unet"} and plan["qc"]["enabled"] is False
    assert plan["samples"][0]["files"] == ["sample_0000_image.nii.gz", "sample_0000.json"]
    table = invoke(app, "generate", "--model", "rflow-mr-brain", "--device", "cpu", "--profile", "mr",
                   "--weights-dir", str(weights), "--dry-run")  # its autoencoder_v1.pt is missing here
    assert table.exit_code == 0, table.stderr  # a dry run lists what a run would download
    assert "to download: autoencoder" in table.stdout and "models/autoencoder_v1.pt" in table.stdout, table.stdout
    (weights / "models/autoencoder_v1.pt").write_bytes(b"")
    (weights / "models/diff_unet_3d_rflow-mr-brain_v1.pt").write_bytes(b"")
    table = invoke(app, "generate", "--model", "rflow-mr-brain", "--device", "cpu", "--profile", "mr",
                   "--weights-dir", str(weights), "--dry-run")
    assert table.exit_code == 0 and "type: none" in table.stdout and "guidance 2" in table.stdout, table.stderr

    refused = invoke(app, "generate", "--model", "rflow-mr", "--device", "cpu", "--weights-dir", str(weights),
                     "--mask", str(tmp_path / "mask.nii.gz"), "--dry-run")
    assert refused.exit_code == 2, refused.stderr
    assert "model rflow-mr generates images only (no ControlNet): drop --mask" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_plugin_command_profile_labels_and_modalities(mr, fresh_app):
    app = fresh_app()
    info = invoke(app, "mr", "info", "--json")
    assert info.exit_code == 0, info.stderr
    assert [m["name"] for m in json.loads(info.stdout)["models"]] == ["rflow-mr", "rflow-mr-brain"]
    modalities = invoke(app, "mr", "modalities", "--json")
    assert {"name": "mri_swi", "id": 20, "from": "maisi-mr"} in json.loads(modalities.stdout)["modalities"]
    assert "mr" in invoke(app, "--help").stdout

    shown = invoke(app, "profiles", "show", "mr", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["fallback"]["max_roi_latent_voxels"] == 512000
    labels = invoke(app, "labels", "chiasm", "--json")
    assert json.loads(labels.stdout)["labels"] == [{"id": 177, "name": "chiasm"}]


def test_plugins_json_lists_each_entry_point(mr, fresh_app):
    app = fresh_app()
    result = invoke(app, "plugins", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    mine = {e["group"]: e for e in document["plugins"] if e["plugin"] == "maisi-mr-test"}
    assert set(mine) == {"maisi.models", "maisi.modalities", "maisi.labels", "maisi.profiles", "maisi.commands"}
    assert all(e["status"] == "ok" and e["version"] == "1.0" and e["error"] is None for e in mine.values())
    assert sorted(mine["maisi.models"]["registered"]) == ["rflow-mr", "rflow-mr-brain"]
    assert mine["maisi.profiles"]["registered"] == ["mr"] and mine["maisi.commands"]["registered"] == ["mr"]
    # ids 133..199 of the CT-MR dictionary for maisi's own, and that dictionary whole (349 names, body 500)
    assert len(mine["maisi.labels"]["registered"]) == 68
    assert "label dictionary ctmr (349 names)" in mine["maisi.labels"]["registered"]
    assert document["load_plugins"] == ["maisi-mr-test"]
    table = invoke(app, "plugins")
    assert table.exit_code == 0 and "rflow-mr" in table.stdout and "fibula" in table.stdout, table.stdout


# --- MR brain v1: the specs against upstream's configs, the CT-MR label dictionary (issue 24 item 2) ----------------
# Upstream values as NV-Generate-CTMR writes them, with the file (and commit) each comes from.
UPSTREAM_MR = {
    # configs/config_maisi_diff_model_rflow-mr.json @ 2cb90dd (diffusion_unet_inference); weights:
    # scripts/download_model_data.py @ 23b84e5 ("rflow-mr": both files on nvidia/NV-Generate-MR)
    "rflow-mr": {"modality_id": 9, "cfg_guidance_scale": 15, "default_steps": 30, "default_size": (128, 256, 256),
                 "spacing": (1.25, 1.0, 1.0), "hf_repo": "nvidia/NV-Generate-MR",
                 "weights": {"autoencoder": "models/autoencoder_v2.pt",
                             "diffusion_unet": "models/diff_unet_3d_rflow-mr.pt"}},
    # modality 9 and cfg_guidance_scale 2 of the v1 configs/config_maisi_diff_model_rflow-mr-brain.json (commit
    # a1bd588: 10 → 2; ../shared/docs/reference-v2.md §1); dim 256³ at 0.8 x 1 x 1 mm and 30 steps of the same file
    # @ 34d81a7; the UNet file of configs/environment_maisi_diff_model_rflow-mr-brain.json @ 2fa7d60, the autoencoder
    # from nvidia/NV-Generate-CT (scripts/download_model_data.py @ 23b84e5)
    "rflow-mr-brain": {"modality_id": 9, "cfg_guidance_scale": 2, "default_steps": 30, "default_size": (256, 256, 256),
                       "spacing": (0.8, 1.0, 1.0), "hf_repo": "nvidia/NV-Generate-MR-Brain",
                       "weights": {"autoencoder": "models/autoencoder_v1.pt",
                                   "diffusion_unet": "models/diff_unet_3d_rflow-mr-brain_v1.pt"}},
}
# scripts/utils.py `check_input_mr` (as skills/infer_image-only.md states it): z = 128 → x = y in {128, 256, 384,
# 512}; z = 256 → 128x256x256, 256x128x256 or 256x256x256; spacing 0.4..5.0 mm on every axis.
UPSTREAM_MR_SIZES = {(xy, xy, 128) for xy in (128, 256, 384, 512)} | {(128, 256, 256), (256, 128, 256),
                                                                     (256, 256, 256)}


@pytest.mark.parametrize("name", sorted(UPSTREAM_MR))
def test_mr_specs_match_upstream(mr, name):
    from maisi_cli.models import get_model

    spec, want = get_model(name), UPSTREAM_MR[name]
    assert (spec.modality_id, spec.cfg_guidance_scale, spec.guidance_scale) == (
        want["modality_id"], want["cfg_guidance_scale"], want["cfg_guidance_scale"])
    assert (spec.default_steps, spec.default_size, spec.hf_repo, dict(spec.weights)) == (
        want["default_steps"], want["default_size"], want["hf_repo"], want["weights"])
    assert spec.default_spacing(spec.default_size) == want["spacing"]
    assert set(spec.size_rules.allowed_sizes) == UPSTREAM_MR_SIZES
    assert spec.size_rules.spacing_xy_range == spec.size_rules.spacing_z_range == (0.4, 5.0)
    assert spec.output_intensity == "mr" and spec.label_dictionary == "ctmr"


def test_labels_model_shows_the_ct_mr_dictionary(mr, fresh_app, tmp_path):
    app = fresh_app()
    mr_table = invoke(app, "labels", "--model", "rflow-mr-brain", "--json")
    assert mr_table.exit_code == 0, mr_table.stderr
    found = {entry["id"]: entry["name"] for entry in json.loads(mr_table.stdout)["labels"]}
    # configs/label_dict_ctmr.json @ 9225a29: ids 1..345 and the brain tumours 401..403, spelt as upstream; body 500
    assert len(found) == 349 and set(found) == set(range(1, 346)) | {401, 402, 403, 500}
    assert (found[401], found[402], found[403], found[500]) == (
        "brain tumor NCR/NETC", "brain tumor ED", "brain tumor ET", "body")
    assert (found[200], found[213], found[248]) == (
        "left mandible", "pharynxConst", "Right-ACgG--anterior-cingulate-gyrus")
    one = invoke(app, "labels", "401", "--model", "rflow-mr", "--json")
    assert json.loads(one.stdout)["labels"] == [{"id": 401, "name": "brain tumor NCR/NETC"}], one.stderr

    ct = invoke(app, "labels", "--json")
    ct_ids = {entry["id"]: entry["name"] for entry in json.loads(ct.stdout)["labels"]}
    assert 401 not in ct_ids and 500 not in ct_ids and ct_ids[200] == "body" and ct_ids[177] == "chiasm"
    assert invoke(app, "labels", "--model", "rflow-ct", "--json").stdout == ct.stdout  # a CT spec names none
    assert invoke(app, "labels", "tumor", "--model", "rflow-mr-brain").stdout.count("brain tumor") == 4

    spec = tmp_path / "orphan.json"
    spec.write_text(json.dumps({**json.loads((MR_PLUGIN / "maisi_mr/models/rflow-mr.json").read_text()),
                                "name": "orphan", "label_dictionary": "nope"}))
    missing = invoke(app, "labels", "--model", str(spec))
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "--model: model orphan names the label dictionary 'nope', which no plugin provides (known: ctmr)" in (
        missing.stderr)
    both = invoke(app, "labels", "--model", "rflow-mr", "--scheme", "vista3d")
    assert both.exit_code == 2 and "drop --model or --scheme" in both.stderr, both.stderr


def test_label_dictionary_plugin_checks(site, monkeypatch):
    """A plugin table with an id below 1 is left out and recorded; a table name two plugins give is refused."""
    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "tables-a,tables-b")
    site("tables-a", {"labels": {"t": "maisi_tables_a:TABLES"}},
         modules={"maisi_tables_a": "TABLES = {'shared': {'thing': 300}, 'bad': {'air': 0}}\n"})
    site("tables-b", {"labels": {"t": "maisi_tables_b:TABLES"}},
         modules={"maisi_tables_b": "TABLES = {'Shared': {'other': 301}}\n"})
    from maisi_cli.labels import label_dictionary, named_label_dictionaries

    assert named_label_dictionaries() == {"shared": {"thing": 300}}
    assert "thing" not in label_dictionary()
    status = {r.plugin: r for r in plugin_records() if r.group == "labels"}
    assert "has ids below 1" in status["tables-a"].error
    assert status["tables-b"].refused == ["Shared (the label dictionary name is taken by another plugin)"]


@pytest.mark.parametrize("value, loaded", [("", False), ("someone-else", False), ("maisi-mr-test", True),
                                           ("MAISI_MR_TEST", True), ("other, mr", True), (None, True)])
def test_load_plugins_filter(site, monkeypatch, value, loaded):
    """Names are distribution or entry-point names (any case, - or _); empty loads none; unset loads all."""
    monkeypatch.syspath_prepend(str(MR_PLUGIN))
    if value is None:
        monkeypatch.delenv("MAISI_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("MAISI_LOAD_PLUGINS", value)
    mr_plugin(site)
    from maisi_cli.models import list_models

    assert ("rflow-mr" in {m.name for m in list_models()}) is loaded
    status = {r.group: r for r in plugin_records() if r.plugin == "maisi-mr-test"}
    assert all(r.skipped is not loaded for r in status.values())


# --- broken and conflicting plugins ----------------------------------------------------------------------------------
def test_broken_plugin_warns_once_and_generate_works(site, fresh_app, monkeypatch, tiny_model, mask_file, tmp_path):
    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "maisi-broken")
    site("maisi-broken", {"commands": {"broken": "maisi_broken_missing.cli:app"},
                          "models": {"broken": "maisi_broken_models:models"}},
         modules={"maisi_broken_models": "def models():\n    raise RuntimeError('boom')\n"})
    app = fresh_app()
    spec, weights = tiny_model
    result = invoke(app, "--json", "generate", "--model", str(spec), "--weights-dir", str(weights), "--mask",
                    str(mask_file), "--out", str(tmp_path / "out"), "--no-qc")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["written"] == [0]
    lines = warning_lines(result.stderr)
    assert len(lines) == 1 and "maisi-broken" in lines[0] and "maisi_broken_missing" in lines[0], result.stderr

    listed = invoke(app, "models", "--json")  # the broken models entry point: recorded, no second warning
    assert listed.exit_code == 0 and "rflow-ct" in listed.stdout and warning_lines(listed.stderr) == []
    status = {e["group"]: e for e in json.loads(invoke(app, "plugins", "--json").stdout)["plugins"]
              if e["plugin"] == "maisi-broken"}
    assert status["maisi.commands"]["status"] == "error" and "ModuleNotFoundError" in status["maisi.commands"]["error"]
    assert "RuntimeError: boom" in status["maisi.models"]["error"]


def test_conflicting_plugin_overrides_nothing(site, fresh_app, monkeypatch, tiny_model):
    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "maisi-thief")
    taken = tiny_spec(tiny_model, "rflow-ct")
    aliased = {**tiny_spec(tiny_model, "fresh-name"), "aliases": ["maisi3d-ddpm"]}
    site("maisi-thief", {
        "models": {"thief": "maisi_thief:models"}, "profiles": {"thief": "maisi_thief:PROFILES"},
        "labels": {"thief": "maisi_thief:LABELS"}, "modalities": {"thief": "maisi_thief:MODALITIES"},
        "commands": {"generate": "maisi_thief:app"},
    }, modules={"maisi_thief": (
        "import typer\n"
        f"SPECS = {taken!r}, {aliased!r}, {tiny_spec(tiny_model, 'thief-ok')!r}\n"
        "def models():\n    return list(SPECS)\n"
        "PROFILES = [{'name': 'cpu', 'device': 'cuda', 'precision': 'fp16',\n"
        "             'fallback': {'max_roi_latent_voxels': 4096, 'overlap': 0.5, 'tp_splits': 1}}]\n"
        "LABELS = {'Liver': 140, 'thief organ': 1, 'new organ': 150}\n"
        "MODALITIES = {'ct': 5}\n"
        "app = typer.Typer()\n"
        "@app.command()\ndef steal():\n    print('stolen')\n")})
    app = fresh_app()
    result = invoke(app, "models", "--json")
    assert result.exit_code == 0, result.stderr
    lines = warning_lines(result.stderr)
    assert len(lines) == 1 and "maisi-thief" in lines[0] and "'generate'" in lines[0], result.stderr

    from maisi_cli.labels import label_dictionary, modality_id
    from maisi_cli.models import get_model
    from maisi_cli.profiles import get_profile

    names = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert "thief-ok" in names and "fresh-name" not in names
    assert get_model("rflow-ct").source == "built-in" and get_model("maisi3d-ddpm").name == "ddpm-ct"
    assert get_profile("cpu").device == "cpu" and modality_id("ct") == 1
    table = label_dictionary()
    assert table["liver"] == 1 and "Liver" not in table and "thief organ" not in table and table["new organ"] == 150
    assert "Generate CT image + label pairs" in invoke(app, "generate", "--help").stdout

    status = {e["group"]: e for e in json.loads(invoke(app, "plugins", "--json").stdout)["plugins"]
              if e["plugin"] == "maisi-thief"}
    assert status["maisi.models"]["status"] == "conflict" and status["maisi.models"]["registered"] == ["thief-ok"]
    assert any(r.startswith("rflow-ct (rflow-ct is taken by maisi") for r in status["maisi.models"]["refused"])
    assert any("maisi3d-ddpm" in r for r in status["maisi.models"]["refused"])
    assert status["maisi.profiles"]["refused"] == ["cpu (the profile name is taken by maisi)"]
    assert status["maisi.modalities"]["refused"] == ["ct (the modality name is taken by maisi)"]
    assert status["maisi.commands"]["refused"] == ["generate (the command name is taken by maisi)"]
    assert len(status["maisi.labels"]["refused"]) == 2


def test_spec_outside_the_target_allow_list_is_refused(site, monkeypatch, tiny_model):
    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "maisi-evil")
    spec = tiny_spec(tiny_model, "evil")
    spec["network"]["autoencoder_def"]["_target_"] = "os.system"
    site("maisi-evil", {"models": {"evil": "maisi_evil:models"}},
         modules={"maisi_evil": f"def models():\n    return [{spec!r}]\n"})
    from maisi_cli.errors import UsageError
    from maisi_cli.models import get_model

    with pytest.raises(UsageError, match="unknown model 'evil'"):
        get_model("evil")
    (record,) = [r for r in plugin_records(["models"]) if r.plugin == "maisi-evil"]
    assert "_target_" in record.error and "os.system" in record.error
    assert plugins.pending_warnings() and "maisi-evil" in plugins.pending_warnings()[0]


def test_broken_plugin_in_a_real_process(site, tmp_path):
    """The installed executable: one warning line on stderr, the command's output untouched."""
    site("maisi-broken", {"commands": {"broken": "maisi_broken_missing:app"}})
    env = {**os.environ, "MAISI_LOAD_PLUGINS": "maisi-broken",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "maisi_cli", "--json", "labels", "liver"], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["labels"][0]["name"] == "liver"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: plugin maisi-broken"), done.stderr


# --- FID feature extractors (maisi.extractors) -----------------------------------------------------------------------
def test_extractor_plugins_are_listed_and_follow_load_plugins(site, fresh_app, monkeypatch, tmp_path):
    """`maisi plugins` lists a maisi.extractors entry point without importing it (a claim on the built-in name is a
    conflict), `maisi fid --extractor-name` uses it, and MAISI_LOAD_PLUGINS leaves it out of both."""
    from tests.unit.test_fid import write_volumes

    site("maisi-fidnet", {"extractors": {"toy": "maisi_fidnet:make", "radimagenet-resnet50": "maisi_fidnet:make"}},
         modules={"maisi_fidnet": "from tests.unit.test_fid import toy_factory as make\n"})
    monkeypatch.delenv("MAISI_LOAD_PLUGINS")  # unset: every plugin loads
    app = fresh_app()
    listed = invoke(app, "plugins", "--json")
    assert listed.exit_code == 0, listed.stderr
    mine = {e["entry_point"]: e for e in json.loads(listed.stdout)["plugins"] if e["plugin"] == "maisi-fidnet"}
    assert (mine["toy"]["group"], mine["toy"]["status"], mine["toy"]["registered"]) == ("maisi.extractors", "ok",
                                                                                        ["toy"])
    assert mine["radimagenet-resnet50"]["status"] == "conflict" and mine["radimagenet-resnet50"]["refused"] == [
        "radimagenet-resnet50 (the name is taken by maisi)"]
    assert "maisi_fidnet" not in sys.modules  # listed, not imported
    table = invoke(app, "plugins")
    assert table.exit_code == 0 and "maisi-fidnet" in table.stdout and "conflict" in table.stdout, table.stdout

    real, synth = write_volumes(tmp_path / "real", 2, 1), write_volumes(tmp_path / "synth", 2, 2)
    args = ["fid", str(real), str(synth), "--target-shape", "16x16x16", "--device", "cpu", "--planes", "xy",
            "--extractor-name", "toy"]
    used = invoke(app, "--json", *args)
    assert used.exit_code == 0, used.stderr
    assert json.loads(used.stdout)["extractor"] == "toy"

    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "someone-else")
    plugins.reset()
    skipped = {e["entry_point"]: e for e in json.loads(invoke(app, "plugins", "--json").stdout)["plugins"]
               if e["plugin"] == "maisi-fidnet"}
    assert {e["status"] for e in skipped.values()} == {"skipped"} and skipped["toy"]["registered"] == []
    left_out = invoke(app, *args)
    assert left_out.exit_code == 2, left_out.stderr
    assert "no extractor 'toy'; installed: radimagenet-resnet50 " in left_out.stderr, left_out.stderr


# --- the example plugin as installed (.ci/run installs plugins/maisi-mr) ----------------------------------------------
def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("maisi-mr"), reason="plugins/maisi-mr is not installed (pip install ./plugins/maisi-mr)")
def test_installed_maisi_mr_plugin():
    maisi = Path(sys.executable).parent / "maisi"
    command = [str(maisi)] if maisi.exists() else [sys.executable, "-m", "maisi_cli"]
    env = {key: value for key, value in os.environ.items() if key != "MAISI_LOAD_PLUGINS"}  # unset: load all

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL)

    status = json.loads(run("plugins", "--json").stdout)["plugins"]
    mine = {e["group"]: e for e in status if e["plugin"] == "maisi-mr"}
    assert len(mine) == 5 and all(e["status"] == "ok" for e in mine.values()), mine
    models = run("models", "--json")
    assert models.returncode == 0 and models.stderr == "", models.stderr
    assert {"rflow-mr", "rflow-mr-brain"} <= {m["name"] for m in json.loads(models.stdout)["models"]}
    info = run("mr", "info", "--json")
    assert info.returncode == 0 and "nvidia/NV-Generate-MR-Brain" in info.stdout, info.stderr
    dry = run("--json", "generate", "--model", "rflow-mr", "--device", "cpu", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["plan"]["download_command"] == "maisi weights download rflow-mr"
    code = ("import sys\nsys.argv = ['maisi', '--help']\nfrom maisi_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY=' + ','.join(m for m in ('torch', 'monai', 'nibabel') if m in sys.modules), file=sys.stderr)\n")
    helped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "Plugin commands" in helped.stdout and helped.stderr.rstrip().endswith("HEAVY="), helped.stderr
