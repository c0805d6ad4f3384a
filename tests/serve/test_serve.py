"""`maisi serve` (issue 27): the MAISI NIM's endpoints with request bodies written from its API reference, jobs whose
files equal `maisi generate`'s, a queue that survives a killed server, and the access rules. The demo model on the
CPU at 32^3 with one denoising step; the networks are loaded once for the module (one Generator shared by the apps,
as one server keeps its own)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from maisi_cli.cli.app import app as cli_app  # noqa: E402
from maisi_cli.serve.app import DB_NAME, ServeConfig, create_app  # noqa: E402
from maisi_cli.serve.jobs import JobStore  # noqa: E402
from maisi_cli.serve.nim import ServeSettings  # noqa: E402
from tests.cli.test_errors import assert_one_line_error  # noqa: E402

SETTINGS = ServeSettings(model="demo", profile="cpu", device="cpu", steps=1, qc=False, allow_any_size=True,
                         previews=False)
# The CLI run these settings and a request for 32^3 stand for
CLI_ARGS = ["--quiet", "generate", "--model", "demo", "--profile", "cpu", "--device", "cpu", "--steps", "1",
            "--no-qc", "--allow-any-size", "--size", "32x32x32"]
PAIR = ("sample_0000_image.nii.gz", "sample_0000_label.nii.gz")
# From the NIM's API reference (payload options) and its example client, at a size the demo model makes quickly
NIM_BODY = {"num_output_samples": 1, "body_region": ["abdomen"], "anatomy_list": ["liver"],
            "output_size": [32, 32, 32], "image_output_ext": ".nii.gz", "label_output_ext": ".nii.gz"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def server(generator, tmp_path_factory):
    """(client, data folder) of one running server for the module."""
    data = tmp_path_factory.mktemp("serve-data")
    with TestClient(create_app(SETTINGS, ServeConfig(data=data), generator=generator)) as client:
        wait_ready(client)
        yield client, data


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/v1/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.05)


def wait_done(client: TestClient, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def cli_pair(tmp_path: Path, *args: str) -> dict[str, bytes]:
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli_app, [*CLI_ARGS, "--out", str(out), *args])
    assert result.exit_code == 0, result.stderr
    return {name: (out / name).read_bytes() for name in PAIR}


def test_nim_endpoints_answer_the_nim_formats(server, tmp_path):
    client, data = server
    assert client.get("/v1/health/live").json() == {"status": "live"}
    assert client.get("/v1/health/ready").json() == {"status": "ready"}
    licence = client.get("/v1/license").json()
    assert licence["license"] == "Apache-2.0" and licence["model"]["name"] == "demo"
    info = client.get("/v1/maisi/info").json()
    assert info["model"] == "demo" and info["version"] and info["labels"]["liver"] == 1

    answer = client.post("/v1/maisi/run", json=NIM_BODY)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    names = set(archive.namelist())
    assert {*PAIR, "sample_0000.json"} <= names
    sidecar = json.loads(archive.read("sample_0000.json"))
    assert sidecar["size"] == [32, 32, 32] and sidecar["anatomy"] == ["liver"] and sidecar["seed"] == 0
    # The same request on the command line (seed 0, the NIM's default run) writes the same bytes
    expected = cli_pair(tmp_path, "--anatomy", "liver")
    assert {name: sha256(archive.read(name)) for name in PAIR} == {n: sha256(b) for n, b in expected.items()}
    assert not list((data / "jobs").glob(".*.zip"))  # the archive was removed once sent

    # local_working_dir: the files stay in that folder inside --data, and the answer is a JSON message
    body = {**NIM_BODY, "local_working_dir": "nim-results/run1"}
    answer = client.post("/v1/maisi/run", json=body)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert set(PAIR) <= set(answer.json()["files"])
    assert {n: sha256((data / "nim-results/run1" / n).read_bytes()) for n in PAIR} == \
        {n: sha256(b) for n, b in expected.items()}  # the same settings: complete samples skipped, same bytes


@pytest.mark.parametrize(("body", "field"), [
    ({"body_region": ["abdomen"]}, "num_output_samples"),
    ({"num_output_samples": 0, "body_region": ["abdomen"]}, "num_output_samples"),
    ({"num_output_samples": 1}, "body_region"),
    ({"num_output_samples": 1, "body_region": ["leg"]}, "body_region"),
    ({"num_output_samples": 1, "body_region": ["chest"], "output_size": [512, 512]}, "output_size"),
    ({"num_output_samples": 1, "body_region": ["chest"], "output_size": [4096, 4096, 4096]}, "output_size"),
    ({"num_output_samples": 1, "body_region": ["chest"], "spacing": [0.2, 1.0, 1.0]}, "spacing"),
    ({"num_output_samples": 1, "body_region": ["abdomen"], "controllable_anatomy_size": [["heart", 0.5]]},
     "controllable_anatomy_size"),
    ({"num_output_samples": 1, "body_region": ["abdomen"], "controllable_anatomy_size": [["liver", 1.5]]},
     "controllable_anatomy_size"),
    ({"num_output_samples": 1, "body_region": ["abdomen"], "controllable_anatomy_size": [["liver", 0.5]] * 11},
     "controllable_anatomy_size"),
    ({"num_output_samples": 1, "body_region": ["abdomen"], "image_output_ext": ".png"}, "image_output_ext"),
    ({"num_output_samples": 1, "body_region": ["abdomen"], "image_output_ext": ".nrrd"}, "label_output_ext"),
    ({"num_output_samples": 1, "body_region": ["abdomen"], "pre_signed_url": "https://example.com/up"},
     "pre_signed_url"),
    ({"num_output_samples": 1, "body_region": ["abdomen"], "num_samples": 2}, "num_samples"),
])
def test_bad_fields_answer_422_naming_the_field(server, body, field):
    client, data = server
    for endpoint in ("/v1/jobs", "/v1/maisi/run"):
        answer = client.post(endpoint, json=body)
        assert answer.status_code == 422, answer.text
        (detail,) = answer.json()["detail"]
        assert detail["loc"] == ["body", field] and detail["msg"].startswith(f"{field}: "), detail


def test_a_job_is_polled_to_done_and_its_files_equal_the_cli_run(server, tmp_path):
    client, data = server
    body = {"num_output_samples": 1, "body_region": ["chest"], "output_size": [32, 32, 32], "seed": 7,
            "image_output_ext": ".nrrd", "label_output_ext": ".nrrd"}
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 202 and answer.json()["state"] == "queued"
    job_id = answer.json()["id"]
    job = wait_done(client, job_id)
    assert job["state"] == "done" and job["error"] is None and job["starts"] == 1
    assert job["progress"]["fraction"] == 1.0 and job["result"]["written"] == [0]
    pair = ("sample_0000_image.nrrd", "sample_0000_label.seg.nrrd")
    assert {*pair, "sample_0000.json"} <= set(job["files"])
    assert job["sidecars"]["sample_0000.json"]["seed"] == 7
    downloaded = {}
    for name in pair:
        answer = client.get(f"/v1/jobs/{job_id}/files/{name}")
        assert answer.status_code == 200
        downloaded[name] = answer.content
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli_app, [*CLI_ARGS, "--seed", "7", "--format", "nrrd", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert {n: sha256(b) for n, b in downloaded.items()} == {n: sha256((out / n).read_bytes()) for n in pair}
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 409  # finished: nothing to cancel


def test_a_job_left_running_by_a_killed_server_is_resumed_once(generator, tmp_path):
    data = tmp_path / "data"
    body = {"num_output_samples": 1, "body_region": ["abdomen"], "output_size": [32, 32, 32], "seed": 3}
    store = JobStore(data / DB_NAME)
    job_id = store.create(body, data / "jobs" / "j1", max_unfinished=8, job_id="j1")
    assert store.claim_next()["id"] == job_id  # the killed server had started it...
    (data / "jobs" / "j1").mkdir(parents=True)
    (data / "jobs" / "j1" / ".sample_0000.lock").write_text("12345\n")  # ...and died holding the sample's lock
    store.close()

    with TestClient(create_app(SETTINGS, ServeConfig(data=data), generator=generator)) as client:
        job = wait_done(client, job_id)
    assert job["state"] == "done" and job["starts"] == 2 and job["result"]["written"] == [0]
    sidecar = (data / "jobs" / "j1" / "sample_0000.json").read_bytes()
    assert json.loads(sidecar)["seed"] == 3
    # A third server over the same data: the job is finished and nothing runs again
    with TestClient(create_app(SETTINGS, ServeConfig(data=data), generator=generator)) as client:
        wait_ready(client)
        time.sleep(0.3)
        again = client.get(f"/v1/jobs/{job_id}").json()
    assert (again["state"], again["starts"], again["finished"]) == ("done", 2, job["finished"])
    assert (data / "jobs" / "j1" / "sample_0000.json").read_bytes() == sidecar


def test_a_full_queue_answers_429_and_a_queued_job_cancels(generator, tmp_path):
    body = {"num_output_samples": 1, "body_region": ["abdomen"], "output_size": [32, 32, 32]}
    app = create_app(SETTINGS, ServeConfig(data=tmp_path / "data", max_queue=2), generator=generator,
                     start_worker=False)
    with TestClient(app) as client:
        first, second = (client.post("/v1/jobs", json=body) for _ in range(2))
        assert first.status_code == second.status_code == 202
        full = client.post("/v1/jobs", json=body)
        assert full.status_code == 429 and "queue" in full.json()["detail"]
        assert client.post("/v1/maisi/run", json=body).status_code == 429
        cancelled = client.delete(f"/v1/jobs/{first.json()['id']}").json()
        assert cancelled["state"] == "cancelled"
        assert client.post("/v1/jobs", json=body).status_code == 202  # a place is free again
        assert client.get("/v1/health/ready").status_code == 503  # no worker: the networks were never loaded
        assert client.get("/v1/jobs/nonexistent").status_code == 404


def test_ready_only_once_the_networks_are_loaded(generator, tmp_path):
    import threading

    gate = threading.Event()

    class SlowLoad:
        spec = generator.spec

        def plan_run(self, *args, **kwargs):
            return generator.plan_run(*args, **kwargs)

        def networks(self, plan, *args):
            gate.wait(30)
            return generator.networks(plan, *args)

    with TestClient(create_app(SETTINGS, ServeConfig(data=tmp_path / "data"), generator=SlowLoad())) as client:
        assert client.get("/v1/health/live").status_code == 200
        assert client.get("/v1/health/ready").status_code == 503
        gate.set()
        wait_ready(client, timeout=30)


def test_a_server_whose_networks_fail_to_load_says_why_and_takes_no_job(generator, tmp_path):
    from maisi_cli.errors import WeightsError

    class Broken:
        spec = generator.spec
        plan_run = staticmethod(generator.plan_run)

        def networks(self, plan, *args):
            raise WeightsError("weights: models/diff_unet.pt is missing; run `maisi weights download`")

    body = {"num_output_samples": 1, "body_region": ["abdomen"], "output_size": [32, 32, 32]}
    with TestClient(create_app(SETTINGS, ServeConfig(data=tmp_path / "data"), generator=Broken())) as client:
        deadline = time.monotonic() + 30
        while "error" not in (ready := client.get("/v1/health/ready")).json():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503 and "diff_unet.pt is missing" in ready.json()["error"]
        answer = client.post("/v1/jobs", json=body)
        assert answer.status_code == 503 and "could not load" in answer.json()["detail"]


def test_a_running_job_cancels_at_its_next_step(generator, tmp_path):
    import threading

    started, gate = threading.Event(), threading.Event()

    class Held:  # the real generator, its first progress event held until the test has cancelled
        spec = generator.spec
        plan_run = staticmethod(generator.plan_run)
        networks = staticmethod(generator.networks)

        def run(self, plan, on_progress, **kwargs):
            def held(event):
                if not started.is_set():
                    started.set()
                    gate.wait(30)
                on_progress(event)
            return generator.run(plan, held, **kwargs)

    body = {"num_output_samples": 2, "body_region": ["abdomen"], "output_size": [32, 32, 32]}
    with TestClient(create_app(SETTINGS, ServeConfig(data=tmp_path / "data"), generator=Held())) as client:
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        assert started.wait(60)
        answer = client.delete(f"/v1/jobs/{job_id}").json()
        assert answer["state"] == "running" and answer["cancel_requested"] is True
        gate.set()
        job = wait_done(client, job_id)
    assert job["state"] == "cancelled" and job["starts"] == 1
    assert not any(name.startswith("sample_") for name in job["files"])
    assert not list((tmp_path / "data" / "jobs" / job_id).glob(".sample_*.lock"))


def test_files_outside_a_job_folder_are_never_served(server, tmp_path):
    client, data = server
    body = {"num_output_samples": 1, "body_region": ["abdomen"], "output_size": [32, 32, 32]}
    job_id = client.get("/v1/jobs").json()["jobs"][0]["id"]  # a job of the tests above
    for name in ("%2E%2E/%2E%2E/" + DB_NAME, "..%2F..%2F" + DB_NAME, "sample_0000.json/..%2F..%2F" + DB_NAME,
                 "%2Fetc%2Fpasswd"):
        answer = client.get(f"/v1/jobs/{job_id}/files/{name}")
        assert answer.status_code == 403, (name, answer.status_code, answer.text)
    # A link planted in a job's folder is neither listed nor followed
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    out = Path(client.app.state.store.get(job_id)["out"])
    os.symlink(secret, out / "leak.txt")
    assert "leak.txt" not in client.get(f"/v1/jobs/{job_id}").json()["files"]
    answer = client.get(f"/v1/jobs/{job_id}/files/leak.txt")
    assert answer.status_code == 404 and "not yours" not in answer.text
    # local_working_dir: only inside --data, never through '..', a link, or the server's own files
    for folder in ("/etc", "../outside", "a/../../outside", "jobs/mine", DB_NAME):
        answer = client.post("/v1/jobs", json={**body, "local_working_dir": folder})
        assert answer.status_code == 403 and answer.json()["detail"].startswith("local_working_dir: "), folder
    os.symlink(tmp_path, data / "elsewhere")
    answer = client.post("/v1/jobs", json={**body, "local_working_dir": "elsewhere/out"})
    assert answer.status_code == 403 and "link" in answer.json()["detail"]
    assert not (tmp_path / "out").exists()


def test_a_token_is_required_on_every_request(generator, tmp_path):
    app = create_app(SETTINGS, ServeConfig(data=tmp_path / "data", token="s3cret"), generator=generator,
                     start_worker=False)
    with TestClient(app) as client:
        for path in ("/v1/health/live", "/v1/maisi/info", "/v1/jobs"):
            answer = client.get(path)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/v1/jobs", json={"num_output_samples": 1}).status_code == 401
        # The page: the browser is asked for the token (HTTP Basic, any user name) and then sends it itself
        page = client.get("/")
        assert page.status_code == 401 and page.headers["www-authenticate"] == 'Basic realm="maisi serve"'
        assert client.get("/", auth=("anyone", "wrong")).status_code == 401
        page = client.get("/", auth=("anyone", "s3cret"))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert client.get("/v1/jobs", auth=("", "s3cret")).status_code == 200


def test_oversized_requests_are_refused(generator, tmp_path):
    app = create_app(SETTINGS, ServeConfig(data=tmp_path / "data", max_body=2048), generator=generator,
                     start_worker=False)
    big = {"num_output_samples": 1, "body_region": ["abdomen"], "anatomy_list": ["liver"] * 1000}
    with TestClient(app) as client:
        answer = client.post("/v1/jobs", json=big)
        assert answer.status_code == 413 and "body" in answer.json()["detail"]

        def chunks():  # no Content-Length: the limit still holds as the body arrives
            for _ in range(10):
                yield b" " * 1024

        assert client.post("/v1/maisi/run", content=chunks(),
                           headers={"Content-Type": "application/json"}).status_code == 413
        assert client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
                           ).status_code == 422


def test_only_json_bodies_and_loopback_names_are_answered(generator, tmp_path):
    """What a web page elsewhere could send a server on 127.0.0.1 without a token: a form or text/plain body
    (no preflight), or any request through a name of its own that resolves to 127.0.0.1 (DNS rebinding)."""
    config = ServeConfig(data=tmp_path / "data", allowed_hosts=("127.0.0.1", "localhost", "::1"))
    app = create_app(SETTINGS, config, generator=generator, start_worker=False)
    body = json.dumps({"num_output_samples": 1, "body_region": ["abdomen"], "output_size": [32, 32, 32]})
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            answer = client.post("/v1/jobs", content=body, headers={"Content-Type": kind} if kind else {})
            assert answer.status_code == 415 and answer.json()["detail"].startswith("Content-Type: "), kind
        assert client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"}).status_code == 202
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert client.get("/v1/health/live", headers={"Host": host}).status_code == 200, host
        answer = client.get("/v1/jobs", headers={"Host": "attacker.example:8000"})
        assert answer.status_code == 421 and answer.json()["detail"].startswith("Host: ")


def test_serve_off_loopback_needs_a_token(monkeypatch, tmp_path):
    import uvicorn

    runner = CliRunner()
    monkeypatch.delenv("MAISI_SERVE_TOKEN", raising=False)
    result = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--model", "demo", "--data", str(tmp_path)])
    assert_one_line_error(result, 2, "--host", "--token")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: served.append((host, port, app)))
    # On loopback without a token: served, answering only requests that name it by a loopback name
    result = runner.invoke(cli_app, ["serve", "--model", "demo", "--data", str(tmp_path / "loopback")])
    assert result.exit_code == 0, result.stderr
    host, port, app = served.pop()
    assert (host, port) == ("127.0.0.1", 8000)
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/v1/health/live").status_code == 200
    assert TestClient(app, base_url="http://rebound.example").get("/v1/health/live").status_code == 421
    # Off loopback with the token from the environment: every request must carry it
    monkeypatch.setenv("MAISI_SERVE_TOKEN", "s3cret")
    result = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--port", "8123", "--model", "demo",
                                     "--data", str(tmp_path / "data")])
    assert result.exit_code == 0, result.stderr
    ((host, port, app),) = served
    assert (host, port) == ("0.0.0.0", 8123)
    client = TestClient(app)  # not started (no networks loaded)
    assert client.get("/v1/health/live").status_code == 401
    assert client.get("/v1/health/live", headers={"Authorization": "Bearer s3cret"}).status_code == 200
