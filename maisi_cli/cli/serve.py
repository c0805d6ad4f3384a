"""`maisi serve`: parse, check the address and token, run the app (maisi_cli/serve) under uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

HELP = ("Serve generation over HTTP: the MAISI NIM's API (/v1/health/live, /v1/health/ready, /v1/license, "
        "/v1/maisi/info, POST /v1/maisi/run), asynchronous jobs (/v1/jobs) kept in SQLite under --data and a web "
        "page at /, one worker with the networks loaded once (extra maisi\\[serve]; docs/serve.md).")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses only this machine reaches."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any but loopback needs --token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    model: str = typer.Option("rflow-ct", "--model", "-m", help="Model name or alias (see `maisi models`), or a spec "
                              ".json."),
    profile: str = typer.Option("auto", "--profile", "-p", help="auto, 16g, 24g, 32g, 80g, cpu, or a profile .toml."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    data: Path = typer.Option(Path("maisi-serve"), "--data", help="Folder of the job store (maisi-serve.db), the "
                              "jobs' files (jobs/ID) and every local_working_dir a request names."),
    token: Optional[str] = typer.Option(None, "--token", envvar="MAISI_SERVE_TOKEN", help="Bearer token every "
                                        "request must carry (Authorization: Bearer TOKEN); required off loopback."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps of a request that gives none "
                                        "(default: the model's)."),
    qc: bool = typer.Option(True, "--qc/--no-qc", help="Check each sample's organ HU medians and re-generate a "
                            "failing one, as generate."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts per sample while it fails the "
                                     "check."),
    allow_any_size: bool = typer.Option(False, "--allow-any-size", help="Lift the model's size/spacing rules "
                                        "(small CPU runs)."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Draw each sample's preview PNG (and its "
                                  "QC report PNG with --qc) beside its files, for the web page at /."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", envvar="MAISI_WEIGHTS_DIR",
                                               help="Folder holding weight files under their repository names."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Jobs queued or running at most; more are "
                                  "answered 429."),
    max_body: int = typer.Option(65536, "--max-body", min=1024, help="Largest request body in bytes; larger ones "
                                 "are answered 413."),
) -> None:
    from maisi_cli.errors import UsageError

    if token is not None and not token.strip():
        raise UsageError("--token: is empty; give a secret string (or unset MAISI_SERVE_TOKEN)")
    if not is_loopback(host) and token is None:
        raise UsageError(f"--host: {host} is reachable from other machines; give --token SECRET (or "
                         "MAISI_SERVE_TOKEN) so every request must carry it, or bind 127.0.0.1")
    try:
        import uvicorn

        from maisi_cli.serve.app import ServeConfig, create_app
        from maisi_cli.serve.nim import ServeSettings
    except ImportError as missing:
        raise UsageError(f"maisi serve: needs the serve extra ({missing.name} is missing); pip install "
                         "'maisi[serve]'") from None

    settings = ServeSettings(model=model, profile=profile, device=device, steps=steps, qc=qc,
                             max_attempts=max_attempts,
                             allow_any_size=allow_any_size, weights_dir=weights_dir,
                             previews=previews)
    # Without a token the server answers only requests that name it by a loopback name (see ServeConfig)
    hosts = None if token else ("127.0.0.1", "localhost", "::1", host.strip("[]").lower())
    app = create_app(settings, ServeConfig(data=data, token=token.strip() if token else None, max_queue=max_queue,
                                           max_body=max_body, allowed_hosts=hosts))
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
