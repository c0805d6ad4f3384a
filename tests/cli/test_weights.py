"""`maisi weights`: download from a hub (a loopback server that answers like huggingface.co), the sha256 lock,
verify, repair, offline import, and the lock check before `generate` loads anything. Real `maisi` processes, so the
Hugging Face variables are set before huggingface_hub is imported."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.cli.test_subprocess import maisi_executable

REPO = "example/tiny-maisi"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


class FakeHub:
    """Two loopback servers: the hub (HEAD/GET /{repo}/resolve/{revision}/{file} → 302 with X-Repo-Commit,
    X-Linked-Etag (the sha256), X-Linked-Size) and a "CDN" on another port (another origin, as the real LFS CDN) that
    serves the bytes with Content-Length and Range requests. `cut` names files whose GET is cut half-way (`cut_once`:
    only the first time); `refuse_ranges` answers 500 to a Range request."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.by_sha = {hashlib.sha256(data).hexdigest(): name for name, data in files.items()}
        self.cut: set[str] = set()
        self.cut_once: set[str] = set()
        self.refuse_ranges = False
        self.requests: list[tuple[str, str, str | None, str | None]] = []  # method, path, Range, Authorization
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def reply(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()

            def answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Range"),
                                     self.headers.get("Authorization")))
                if self.path.startswith("/cdn/"):
                    return self.serve_bytes(self.path[len("/cdn/"):], body)
                match = RESOLVE.match(self.path)
                if not match or unquote(match["repo"]) != REPO:
                    return self.reply(404, {"X-Error-Code": "RepoNotFound", "Content-Length": "0"})
                if unquote(match["revision"]) not in ("main", COMMIT):
                    return self.reply(404, {"X-Error-Code": "RevisionNotFound", "Content-Length": "0"})
                name = unquote(match["filename"])
                if name not in hub.files:
                    return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT,
                                            "Content-Length": "0"})
                data = hub.files[name]
                sha = hashlib.sha256(data).hexdigest()
                self.reply(302, {
                    "Location": f"http://127.0.0.1:{hub.cdn.server_port}/cdn/{sha}",
                    "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Content-Length": "0",
                })

            def serve_bytes(self, sha: str, body: bool) -> None:
                name = hub.by_sha.get(sha)
                if name is None:
                    return self.reply(404, {"Content-Length": "0"})
                data = hub.files[name]
                ranged = self.headers.get("Range")
                start = int(re.match(r"bytes=(\d+)-", ranged)[1]) if ranged else 0
                if ranged and hub.refuse_ranges:
                    return self.reply(500, {"Content-Length": "0"})
                headers = {"Content-Length": str(len(data) - start), "Accept-Ranges": "bytes",
                           "ETag": f'"{sha}"', "Content-Type": "application/octet-stream"}
                if ranged:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self.reply(206 if ranged else 200, headers)
                if not body:
                    return
                if name in hub.cut or name in hub.cut_once:
                    hub.cut_once.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # the client sees the body end early
                    return
                self.wfile.write(data[start:])

        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        for server in (self.hub, self.cdn):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_port}"

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


@pytest.fixture
def tiny_repo(tiny_model, tmp_path):
    """(spec path, {repository name: bytes}): the tiny model's checkpoints plus one small data file, as a spec whose
    hf_repo is example/tiny-maisi."""
    spec_path, weights = tiny_model
    document = json.loads(spec_path.read_text())
    document["weights"] = {k: v for k, v in document["weights"].items()
                           if k in ("autoencoder", "diffusion_unet", "controlnet")}
    document["datasets"] = {"anatomy_size_conditions": "datasets/all_anatomy_size_conditions.json"}
    document["licence"] = "Tiny Test Licence 1.0"
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(document))
    files = {name: (weights / name).read_bytes() for name in document["weights"].values()}
    files["datasets/all_anatomy_size_conditions.json"] = b'[{"organ": "liver", "sizes": [0.1, 0.2]}]\n'
    return spec, files


@pytest.fixture
def hub(tiny_repo):
    server = FakeHub(tiny_repo[1])
    yield server
    server.close()


@pytest.fixture
def env(tmp_path, hub):
    """A process environment online against the loopback hub, with its own caches."""
    values = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MAISI_"))}
    values.update({"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
                   "MAISI_HOME": str(tmp_path / "maisi-home"), "HF_HUB_DISABLE_XET": "1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"})
    return values


def maisi(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*maisi_executable(), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**env, **extra}, stdin=subprocess.DEVNULL)


def one_error_line(done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The error is one line, the last on stderr; before it only the licence line and progress log lines (none at
    all with --quiet); no traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), done.stderr
    assert all(line.startswith(("[", "Licence of")) for line in lines[:-1]), done.stderr
    if "--quiet" in done.args:
        assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert "Traceback" not in done.stderr
    return lines[-1]


def hub_cache(env: dict[str, str]) -> Path:
    return Path(env["HF_HOME"]) / "hub" / "models--example--tiny-maisi"


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".incomplete", ".partial", ".tmp"))]


def test_download_lock_verify_repair_import_and_generate(tiny_repo, hub, env, tmp_path, mask_file):
    spec, files = tiny_repo
    fix = f"maisi weights download {spec.resolve()} --component diffusion_unet --force"

    # 1. download: every file into the Hugging Face cache, licence named once, a log line per file, a lock
    done = maisi(env, "--json", "weights", "download", spec)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {f["file"]: f["status"] for f in report["files"]} == {name: "downloaded" for name in files}
    assert all(f["lock"] == "recorded" for f in report["files"])
    assert done.stderr.count("Tiny Test Licence 1.0") == 1
    for name in files:
        assert done.stderr.count(f"download {name}") == 1, done.stderr
    lock_file = Path(env["MAISI_HOME"]) / "locks" / "example--tiny-maisi@main.json"
    lock = json.loads(lock_file.read_text())
    assert lock["repo"] == REPO and lock["revision"] == "main"
    assert {n: (e["sha256"], e["size"]) for n, e in lock["files"].items()} == {
        n: (hashlib.sha256(d).hexdigest(), len(d)) for n, d in files.items()}
    paths = {f["file"]: Path(f["path"]) for f in report["files"]}
    for name, path in paths.items():
        assert path.is_relative_to(hub_cache(env) / "snapshots" / COMMIT) and path.read_bytes() == files[name]
    assert leftovers(hub_cache(env)) == []

    # 2. a second download finds everything cached: no GET, lock matches
    hub.requests.clear()
    again = json.loads(maisi(env, "--json", "weights", "download", spec, "--models-only").stdout)
    assert {f["status"] for f in again["files"]} == {"cached"} and len(again["files"]) == 3
    assert not [r for r in hub.requests if r[0] == "GET"]

    # 3. verify passes
    checked = maisi(env, "--json", "weights", "verify", spec)
    assert checked.returncode == 0, checked.stderr
    assert {f["status"] for f in json.loads(checked.stdout)["models"][0]["files"]} == {"ok"}

    # 4. one byte of a cached file changes: verify and generate refuse it, naming the file and the fix
    unet = paths["models/diff_unet_3d_rflow-ct.pt"].resolve()
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    one_error_line(maisi(env, "--quiet", "weights", "verify", spec), 1, "models/diff_unet_3d_rflow-ct.pt", fix)
    out = tmp_path / "out"
    one_error_line(maisi(env, "--quiet", "generate", "--model", spec, "--mask", mask_file, "--out", out, "--no-qc"),
                   1, "diff_unet_3d_rflow-ct.pt", "no longer matches the sha256 locked", fix)
    assert not out.exists() or not any(out.iterdir())
    # a download without --force does not paper over it
    one_error_line(maisi(env, "weights", "download", spec, "--component", "diffusion_unet"), 1, fix)

    # 5. download --force repairs it
    repaired = maisi(env, "weights", "download", spec, "--component", "diffusion_unet", "--force")
    assert repaired.returncode == 0, repaired.stderr
    assert unet.read_bytes() != bytes(data) and paths["models/diff_unet_3d_rflow-ct.pt"].read_bytes() == files[
        "models/diff_unet_3d_rflow-ct.pt"]
    assert maisi(env, "weights", "verify", spec).returncode == 0

    # 6. offline import from a folder brought from another machine (the Hugging Face cache is gone)
    shutil.rmtree(Path(env["HF_HOME"]))
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    brought = tmp_path / "brought"
    for name, payload in files.items():
        (brought / name).parent.mkdir(parents=True, exist_ok=True)
        (brought / name).write_bytes(payload)
    bad = brought / "models/controlnet_3d_rflow-ct.pt"
    damaged = bytearray(files["models/controlnet_3d_rflow-ct.pt"])
    damaged[100] ^= 0x01
    bad.write_bytes(bytes(damaged))
    store = Path(env["MAISI_HOME"]) / "weights" / "example--tiny-maisi" / "main"
    one_error_line(maisi(offline, "weights", "import", brought, spec), 1, str(bad), "does not match the sha256")
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]
    bad.write_bytes(files["models/controlnet_3d_rflow-ct.pt"])
    imported = maisi(offline, "--json", "weights", "import", brought, spec)
    assert imported.returncode == 0, imported.stderr
    assert {f["status"] for f in json.loads(imported.stdout)["files"]} == {"imported"}
    for name, payload in files.items():
        assert (store / name).read_bytes() == payload
    assert leftovers(store) == []
    assert json.loads(lock_file.read_text()) == lock  # the lock held, unchanged

    # 7. generate (offline) reads the imported files
    generated = maisi(offline, "--json", "generate", "--model", spec, "--mask", mask_file, "--out", out, "--no-qc",
                      "--steps", "1")
    assert generated.returncode == 0, generated.stderr
    used = json.loads(generated.stdout)["plan"]["weights"]
    assert set(used) == {"autoencoder", "diffusion_unet", "controlnet"}
    assert all(Path(p).is_relative_to(store) for p in used.values()), used

    # 8. path and list show them
    where = json.loads(maisi(offline, "--json", "weights", "path", spec).stdout)["models"][0]["files"]
    assert {f["file"]: f["path"] for f in where} == {name: str(store / name) for name in files}
    table = maisi(offline, "weights", "path", spec)
    assert table.returncode == 0 and "store" in table.stdout
    listed = json.loads(maisi(offline, "--json", "weights", "list", spec).stdout)["models"][0]["files"]
    assert all(f["present"] and f["locked"] and f["where"] == "store" for f in listed)
    assert {f["size"] for f in listed} == {len(d) for d in files.values()}


ARCHIVE = "datasets/all_masks_flexible_size_and_spacing_4000.zip"


@pytest.fixture
def archive_spec(tiny_repo, hub, tmp_path):
    """A spec whose one data file is 24 MB: huggingface_hub writes in 10 MB chunks, so a connection cut half-way
    leaves a written chunk to resume from."""
    spec, _ = tiny_repo
    document = json.loads(spec.read_text())
    document["datasets"] = {"mask_archive": ARCHIVE}
    path = tmp_path / "archive.json"
    path.write_text(json.dumps(document))
    payload = os.urandom(24 * 1000 * 1000)
    hub.files[ARCHIVE] = payload
    hub.by_sha[hashlib.sha256(payload).hexdigest()] = ARCHIVE
    return path, payload


def test_interrupted_download_leaves_nothing_under_the_final_name(archive_spec, hub, env):
    spec, payload = archive_spec
    hub.cut.add(ARCHIVE)
    hub.refuse_ranges = True  # the resume attempt fails too
    done = maisi(env, "--quiet", "weights", "download", spec, "--component", "mask_archive")
    one_error_line(done, 1, ARCHIVE, "failed", "run the command again")
    assert [r for r in hub.requests if r[0] == "GET" and r[2]], hub.requests  # huggingface_hub tried to resume
    cache = hub_cache(env)
    blob = cache / "blobs" / hashlib.sha256(payload).hexdigest()
    assert not blob.exists() and not (cache / "snapshots" / COMMIT / ARCHIVE).exists()
    assert [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 0 and p.parent.name != "refs"] == []
    assert leftovers(cache) == []
    lock_file = Path(env["MAISI_HOME"]) / "locks" / "example--tiny-maisi@main.json"
    assert not lock_file.exists() or ARCHIVE not in json.loads(lock_file.read_text())["files"]


def test_dropped_connection_is_resumed_with_a_range_request(archive_spec, hub, env, tmp_path):
    """Also: HF_HUB_CACHE places the cache, HF_TOKEN is sent to the hub (not to the CDN it redirects to)."""
    spec, payload = archive_spec
    hub.cut_once.add(ARCHIVE)
    cache = tmp_path / "elsewhere"
    done = maisi(env, "--json", "weights", "download", spec, "--component", "mask_archive",
                 HF_HUB_CACHE=str(cache), HF_TOKEN="hf_testtoken")
    assert done.returncode == 0, done.stderr
    heads = [r for r in hub.requests if r[0] == "HEAD"]
    assert heads and all(r[3] == "Bearer hf_testtoken" for r in heads), hub.requests
    assert all(r[3] is None for r in hub.requests if r[1].startswith("/cdn/"))
    assert "resume" not in done.stderr  # huggingface_hub's retry log is kept off the user's screen
    ranges = [r[2] for r in hub.requests if r[0] == "GET" and r[2]]
    assert len(ranges) == 1 and 0 < int(ranges[0][len("bytes="):-1]) < len(payload), hub.requests
    document = json.loads(done.stdout)
    assert Path(document["files"][0]["path"]).is_relative_to(cache / "models--example--tiny-maisi")
    assert Path(document["files"][0]["path"]).read_bytes() == payload
    assert document["files"][0]["sha256"] == hashlib.sha256(payload).hexdigest()


def test_offline_without_a_cached_file_is_one_line(tiny_repo, env):
    spec, _ = tiny_repo
    done = maisi(env, "--quiet", "weights", "download", spec, HF_HUB_OFFLINE="1")
    one_error_line(done, 1, "models/autoencoder_v1.pt", "offline", "HF_HUB_OFFLINE", "maisi weights import DIR")


def test_missing_file_on_the_hub_and_unknown_revision(tiny_repo, env, tmp_path):
    spec, _ = tiny_repo
    document = json.loads(spec.read_text())
    document["datasets"] = {"mask_database": "datasets/not-there.json"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(document))
    one_error_line(maisi(env, "weights", "download", other, "-c", "mask_database"), 1,
                   "has no file datasets/not-there.json")
    one_error_line(maisi(env, "weights", "download", spec, "--revision", "v9", "-c", "autoencoder"), 2,
                   "--revision", "'v9'")


runner = CliRunner()


@pytest.mark.parametrize(("args", "fragments"), [
    (["weights", "download", "no-such-model"], ["MODEL", "unknown model 'no-such-model'", "rflow-ct"]),
    (["weights", "download", "rflow-ct", "--component", "vae"], ["--component", "'vae'", "diffusion_unet"]),
    (["weights", "download", "rflow-ct", "-c", "mask_database", "--models-only"], ["--models-only"]),
    (["weights", "verify", "nope"], ["MODEL", "unknown model 'nope'", "radimagenet-resnet50"]),
    (["weights", "list", "nope"], ["MODEL", "unknown model 'nope'", "rflow-ct", "radimagenet-resnet50"]),
    (["weights", "path", "nope"], ["MODEL", "unknown model 'nope'", "rflow-ct", "radimagenet-resnet50"]),
    (["weights", "download", "nope"], ["MODEL", "unknown model 'nope'", "radimagenet-resnet50"]),
])
def test_usage_errors_exit_2(args, fragments):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.stderr


def test_list_and_path_with_nothing_downloaded():
    document = json.loads(runner.invoke(app, ["--json", "weights", "list"]).stdout)
    rflow = {m["name"]: m for m in document["models"]}["rflow-ct"]
    files = {f["file"]: f for f in rflow["files"]}
    assert "models/diff_unet_3d_rflow-ct.pt" in files and "datasets/all_anatomy_size_conditions.json" in files
    assert not any(f["present"] or f["locked"] for f in files.values())
    table = runner.invoke(app, ["weights", "path", "rflow-ct"])
    assert table.exit_code == 0 and "missing" in table.stdout
    verify = runner.invoke(app, ["weights", "verify", "rflow-ct"])
    assert verify.exit_code == 0 and "missing" in verify.stdout


EXTRACTOR = "radimagenet-resnet50"
EXTRACTOR_FILE = "RadImageNet-ResNet50_notop.pth"


@pytest.fixture
def extractor_hub(tmp_path, monkeypatch):
    """`maisi weights download radimagenet-resnet50` in process, online, against a stand-in for hf_hub_download
    that writes the Hugging Face cache layout (under the test's HF_HOME). Returns the file's bytes."""
    import huggingface_hub

    from tests.unit.test_hub import put_in_hf_cache

    payload = b"RadImageNet ResNet-50 stand-in " * 64

    def fake_download(repo, filename, **kwargs):
        assert (repo, filename) == ("MONAI/checkpoints", EXTRACTOR_FILE)
        return str(put_in_hf_cache(tmp_path, repo, filename, payload))

    def fake_metadata(url, **kwargs):  # the sizes `weights list` asks the hub for: no request leaves the machine
        return SimpleNamespace(size=len(payload) if url.endswith(EXTRACTOR_FILE) else 1000)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fake_metadata)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return payload


def json_of(*args: str) -> dict:
    result = runner.invoke(app, ["--json", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_list_path_verify_show_the_fid_extractor(extractor_hub, tmp_path):
    """list, path and verify know the file `maisi weights download radimagenet-resnet50` fetches: missing before,
    present and locked after, read from where `maisi fid` reads it, and a changed copy fails verify in one line."""
    from maisi_cli.engine import hub as hub_engine
    from maisi_cli.engine.fid import locate_radimagenet

    # before the download: listed after the models, missing, not locked
    everything = json_of("weights", "list")["models"]
    assert everything[-1]["name"] == EXTRACTOR and "rflow-ct" in [m["name"] for m in everything[:-1]]
    model_entry = {m["name"]: m for m in everything}["rflow-ct"]
    listed = json_of("weights", "list", EXTRACTOR)["models"]
    assert [(m["name"], m["hf_repo"], m["revision"]) for m in listed] == [(EXTRACTOR, "MONAI/checkpoints", "main")]
    assert listed == everything[-1:]
    assert set(listed[0]) == set(model_entry) and set(listed[0]["files"][0]) == set(model_entry["files"][0])
    assert listed[0]["files"][0] == {
        "component": EXTRACTOR, "file": EXTRACTOR_FILE, "kind": "weights", "path": None, "where": None,
        "present": False, "size": None, "locked": False, "download_size": len(extractor_hub), "size_source": "hub"}
    table = runner.invoke(app, ["weights", "list", EXTRACTOR])
    assert table.exit_code == 0 and "missing" in table.stdout and "rflow-ct" not in table.stdout
    where = json_of("weights", "path", EXTRACTOR)["models"]
    assert [m["name"] for m in where] == [EXTRACTOR] and where[0]["files"][0]["path"] is None
    assert json_of("weights", "path")["models"][-1] == where[0]
    assert set(where[0]["files"][0]) == set(json_of("weights", "path", "rflow-ct")["models"][0]["files"][0])
    assert locate_radimagenet() is None
    checked = json_of("weights", "verify", EXTRACTOR)["models"]
    assert [(m["name"], m["ok"], m["files"][0]["status"]) for m in checked] == [(EXTRACTOR, True, "missing")]
    verify_model = json_of("weights", "verify", "rflow-ct")["models"][0]
    assert set(checked[0]) == set(verify_model) and set(checked[0]["files"][0]) == set(verify_model["files"][0])

    # a fake download: present, locked, read from the Hugging Face cache, exactly where `maisi fid` reads it
    downloaded = runner.invoke(app, ["--quiet", "weights", "download", EXTRACTOR])
    assert downloaded.exit_code == 0, downloaded.stderr
    digest = hashlib.sha256(extractor_hub).hexdigest()
    fid_path, locked_sha = locate_radimagenet()
    assert locked_sha == digest
    entry = json_of("weights", "list", EXTRACTOR)["models"][0]["files"][0]
    assert (entry["present"], entry["locked"], entry["size"], entry["where"]) == (True, True, len(extractor_hub),
                                                                                  "hf-cache")
    assert entry["path"] == str(fid_path)
    assert json_of("weights", "list")["models"][-1]["files"][0] == entry
    table = runner.invoke(app, ["weights", "list"])
    assert table.exit_code == 0 and "present" in table.stdout and "hf-cache" in table.stdout
    where = json_of("weights", "path", EXTRACTOR)["models"][0]["files"][0]
    assert (where["path"], where["where"]) == (str(fid_path), "hf-cache")
    assert fid_path.is_relative_to(tmp_path / "hf-home" / "hub" / "models--MONAI--checkpoints")
    checked = json_of("weights", "verify", EXTRACTOR)["models"][0]
    assert checked["ok"] and checked["files"][0] == {
        "component": EXTRACTOR, "file": EXTRACTOR_FILE, "kind": "weights", "where": "hf-cache", "path": str(fid_path),
        "status": "ok", "sha256": digest, "locked_sha256": digest}
    assert runner.invoke(app, ["weights", "verify"]).exit_code == 0

    # a copy brought by hand wins, for `maisi fid` and for `path`
    own = hub_engine.extractor_file(EXTRACTOR).hand_placed
    own.parent.mkdir(parents=True)
    own.write_bytes(b"my own copy")
    where = json_of("weights", "path", EXTRACTOR)["models"][0]["files"][0]
    assert (where["path"], where["where"]) == (str(own), "hand-placed") and locate_radimagenet() == (own, None)
    assert json_of("weights", "list", EXTRACTOR)["models"][0]["files"][0]["size"] == len(b"my own copy")
    own.unlink()

    # one byte changes in the cache: verify (named or not) exits 1 with one line naming the file and the fix
    data = bytearray(extractor_hub)
    data[7] ^= 0xFF
    fid_path.resolve().write_bytes(bytes(data))
    for args in ([EXTRACTOR], []):
        result = runner.invoke(app, ["--quiet", "weights", "verify", *args])
        assert result.exit_code == 1, (result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(fid_path) in lines[0] and f"({EXTRACTOR})" in lines[0], lines[0]
        assert lines[0].endswith(f"re-fetch with: maisi weights download {EXTRACTOR} --force"), lines[0]
    failed = runner.invoke(app, ["--json", "weights", "verify", EXTRACTOR])
    assert failed.exit_code == 1 and json.loads(failed.stdout)["models"][0]["files"][0]["status"] == "mismatch"
    # the download repairs it
    assert runner.invoke(app, ["--quiet", "weights", "download", EXTRACTOR, "--force"]).exit_code == 0
    assert runner.invoke(app, ["weights", "verify", EXTRACTOR]).exit_code == 0


def test_weights_help_does_not_import_heavy_modules():
    code = (
        "import sys\nsys.argv = ['maisi', 'weights', 'download', '--help']\n"
        "from maisi_cli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'monai', 'nibabel', 'huggingface_hub') if m in sys.modules),"
        " file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.rstrip().endswith("HEAVY="), done.stderr


def test_verify_fails_on_a_locked_file_that_is_missing(extractor_hub):
    """A file fetched once (in the lock) whose copy is gone: verify exits 1 with one line naming the file and the
    fetch command, and its JSON says which file is missing; files never fetched stay a plain "missing"."""
    from maisi_cli.engine import hub as hub_engine
    from maisi_cli.engine import store

    store.record_in_lock("nvidia/NV-Generate-CT", "main", "models/diff_unet_3d_rflow-ct.pt", "1" * 64, 10, "download")
    for args in (["rflow-ct"], []):
        result = runner.invoke(app, ["--quiet", "weights", "verify", *args])
        assert result.exit_code == 1, (result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "models/diff_unet_3d_rflow-ct.pt (rflow-ct diffusion_unet)" in lines[0] and "missing" in lines[0], lines[0]
        assert lines[0].endswith("fetch it with: maisi weights download rflow-ct --component diffusion_unet"), lines[0]
    failed = runner.invoke(app, ["--json", "weights", "verify", "rflow-ct"])
    assert failed.exit_code == 1
    model = json.loads(failed.stdout)["models"][0]
    assert model["ok"] is False and "models/diff_unet_3d_rflow-ct.pt" in model["error"]
    files = {f["file"]: f for f in model["files"]}
    locked = files["models/diff_unet_3d_rflow-ct.pt"]
    assert (locked["status"], locked["locked_sha256"]) == ("missing", "1" * 64)
    assert files["models/autoencoder_v1.pt"]["locked_sha256"] is None  # never fetched: not a failure

    # the extractor: downloaded (locked), then its cached copy removed
    assert runner.invoke(app, ["--quiet", "weights", "download", EXTRACTOR]).exit_code == 0
    cached = store.cached_file(hub_engine.extractor_file(EXTRACTOR))
    cached.unlink()
    result = runner.invoke(app, ["--quiet", "weights", "verify", EXTRACTOR])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert EXTRACTOR_FILE in result.stderr
    assert result.stderr.strip().endswith(f"fetch it with: maisi weights download {EXTRACTOR}"), result.stderr
    extractor = json.loads(runner.invoke(app, ["--json", "weights", "verify", EXTRACTOR]).stdout)["models"][0]
    assert extractor["ok"] is False and extractor["files"][0]["status"] == "missing"
