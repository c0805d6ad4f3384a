"""`maisi weights download|list|verify|import|path`: a model's repository files, their sha256 lock, offline import.

Thin: parse, call engine/hub.py, render. huggingface_hub is imported only inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maisi_cli.cli import render

app = typer.Typer(help="Download, list, verify and import model weights (sha256-locked under MAISI_HOME).",
                  no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document.")
REVISION_OPTION = typer.Option(None, "--revision", help="Repository branch, tag or commit (default: the model's).")
WEIGHTS_DIR_OPTION = typer.Option(None, "--weights-dir", envvar="MAISI_WEIGHTS_DIR",
                                  help="Folder holding weight files under their repository names (looked at first).")


def _model(name: str, revision: Optional[str]):
    from maisi_cli.engine.hub import with_revision
    from maisi_cli.errors import UsageError
    from maisi_cli.models import get_model

    try:
        spec = get_model(name)
    except UsageError as error:
        raise UsageError(str(error).replace("--model:", "MODEL:", 1)) from None
    return with_revision(spec, revision)


def _models(name: Optional[str], revision: Optional[str], with_repository: bool = False) -> list:
    from maisi_cli.engine.hub import with_revision
    from maisi_cli.models import list_models

    if name is not None:
        return [_model(name, revision)]
    return [with_revision(s, revision) for s in list_models() if s.hf_repo or not with_repository]


def _size(size: Optional[int]) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(size)


def _short(digest: Optional[str]) -> str:
    return f"{digest[:12]}…" if digest else "-"


def _notice(message: str, output: render.Output) -> None:
    """A line for people on stderr (never stdout: it may hold the JSON document); none with --quiet."""
    if not output.quiet:
        render.stderr_console().print(message, soft_wrap=True, markup=False, highlight=False)


def _table(title: Optional[str], columns: tuple[str, ...], rows: list) -> None:
    """render.print_table, but file names and paths fold onto more lines instead of being cut with an ellipsis."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold" if column in ("file", "path") else "ellipsis")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    render.stdout_console().print(table)


def _licence_line(spec, output: render.Output) -> None:
    licence = spec.licence or f"see the Hugging Face repository {spec.hf_repo}"
    _notice(f"Licence of the {spec.name} files: {licence}", output)


def _show_results(spec, repo: str, results: list, output: render.Output, **extra) -> None:
    """The files a download or an import handled: one JSON document, or a table and the lock's path."""
    from maisi_cli.engine.hub import lock_path

    lock = lock_path(repo, spec.hf_revision)
    if output.json:
        render.print_json({"model": spec.name, "repo": repo, "revision": spec.hf_revision, **extra, "lock": str(lock),
                           "files": [r.document() for r in results]})
        return
    if output.quiet:
        return
    rows = [(r.component, r.repo_name, r.status, _size(r.size), _short(r.sha256), r.lock or "-") for r in results]
    _table(f"{spec.name}: {repo}@{spec.hf_revision}", ("component", "file", "status", "size", "sha256", "lock"), rows)
    render.info(f"lock: {lock}", output)


@app.command("download")
def download_command(
    ctx: typer.Context,
    model: str = typer.Argument("rflow-ct", help="Model name or alias (see `maisi models`), a spec .json, or "
                                "radimagenet-resnet50 (the `maisi fid` feature extractor)."),
    component: list[str] = typer.Option([], "--component", "-c",
                                        help="Only this file (a weights or datasets key of the model; repeatable)."),
    models_only: bool = typer.Option(False, "--models-only", help="Skip the data files (datasets/…)."),
    revision: Optional[str] = REVISION_OPTION,
    force: bool = typer.Option(False, "--force", help="Fetch again even when a copy is cached (repairs one)."),
    json_flag: bool = JSON_OPTION,
) -> None:
    """Download a model's files into the Hugging Face cache and lock their sha256. Also takes
    `radimagenet-resnet50`: the feature extractor of `maisi fid`."""
    from maisi_cli.engine.hub import download, extractor_file, repo_files, require_repository

    output = render.output_of(ctx.obj, json_flag)
    item = extractor_file(model)
    if item is not None:
        _download_extractor(item, component, models_only, revision, force, output)
        return
    spec = _model(model, revision)
    repo = require_repository(spec)
    files = repo_files(spec, component, models_only)
    _licence_line(spec, output)
    with render.progress(output) as on_progress:
        results = download(spec, files, force=force, on_progress=on_progress)
    _show_results(spec, repo, results, output, licence=spec.licence)


def _download_extractor(item, component: list[str], models_only: bool, revision: Optional[str], force: bool,
                        output: render.Output) -> None:
    """`maisi weights download radimagenet-resnet50`: one file, same cache, lock and output as a model's files."""
    from types import SimpleNamespace

    from maisi_cli.engine.hub import download_hub_file, hand_placed_path
    from maisi_cli.errors import UsageError

    if component or models_only:
        flag = "--component" if component else "--models-only"
        raise UsageError(f"{flag}: {item.name} is a single file; drop {flag}")
    hint = f"copy {item.filename} to '{hand_placed_path(item)}'"
    spec = SimpleNamespace(name=item.name, hf_revision=revision or item.revision, licence=item.licence,
                           hf_repo=item.hf_repo)
    _licence_line(spec, output)
    with render.progress(output) as on_progress:
        result = download_hub_file(item, revision, force=force, on_progress=on_progress, offline_hint=hint)
    _show_results(spec, item.hf_repo, [result], output, licence=item.licence)


@app.command("list")
def list_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model name, alias or spec .json (default: every model)."),
    weights_dir: Optional[Path] = WEIGHTS_DIR_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """List a model's files: present or missing, size, whether their sha256 is locked."""
    from maisi_cli.engine.hub import locations

    output = render.output_of(ctx.obj, json_flag)
    entries = [(spec, locations(spec, weights_dir)) for spec in _models(model, revision)]
    if output.json:
        render.print_json({"models": [
            {"name": spec.name, "hf_repo": spec.hf_repo, "revision": spec.hf_revision,
             "files": [f.document() for f in found]} for spec, found in entries]})
        return
    rows = [(spec.name, f.component, f.repo_name, "present" if f.path else "missing", _size(f.size),
             "yes" if f.locked else "no", f.source or "-") for spec, found in entries for f in found]
    _table(None, ("model", "component", "file", "status", "size", "locked", "where"), rows)


@app.command("verify")
def verify_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model name, alias or spec .json (default: every model)."),
    revision: Optional[str] = REVISION_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Re-hash every file maisi manages and compare it with the lock; exit 1 on a mismatch."""
    from maisi_cli.engine.hub import mismatch_error, repo_files, verify

    output = render.output_of(ctx.obj, json_flag)
    specs = _models(model, revision, with_repository=True)
    hashed: dict = {}
    checked = []
    with render.progress(output) as on_progress:
        for spec in specs:
            checked.append((spec, verify(spec, repo_files(spec), on_progress, hashed)))
    if output.json:
        render.print_json({"models": [
            {"name": spec.name, "hf_repo": spec.hf_repo, "revision": spec.hf_revision,
             "ok": not any(r.status == "mismatch" for r in results), "files": [r.document() for r in results]}
            for spec, results in checked]})
    else:
        rows = [(spec.name, r.component, r.repo_name, r.where or "-", r.status, _short(r.sha256))
                for spec, results in checked for r in results]
        _table(None, ("model", "component", "file", "where", "status", "sha256"), rows)
    for spec, results in checked:
        error = mismatch_error(spec, results)
        if error is not None:
            raise error


@app.command("import")
def import_command(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder with the files under their repository names (models/…, "
                                           "datasets/…), e.g. from `hf download --local-dir` on another machine."),
    model: str = typer.Argument("rflow-ct", help="Model name or alias, or a spec .json."),
    revision: Optional[str] = REVISION_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Copy a model's files from a folder into maisi's store (no network), checked against the lock."""
    from maisi_cli.engine.hub import import_folder, require_repository

    output = render.output_of(ctx.obj, json_flag)
    spec = _model(model, revision)
    repo = require_repository(spec)
    _licence_line(spec, output)
    with render.progress(output) as on_progress:
        results = import_folder(folder, spec, on_progress)
    _show_results(spec, repo, results, output)


@app.command("path")
def path_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model name, alias or spec .json (default: every model)."),
    weights_dir: Optional[Path] = WEIGHTS_DIR_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Print where each file of a model is read from (or "missing")."""
    from maisi_cli.engine.hub import locations

    output = render.output_of(ctx.obj, json_flag)
    entries = [(spec, locations(spec, weights_dir)) for spec in _models(model, revision)]
    if output.json:
        render.print_json({"models": [
            {"name": spec.name, "files": [{"component": f.component, "file": f.repo_name,
                                           "path": str(f.path) if f.path else None, "where": f.source}
                                          for f in found]} for spec, found in entries]})
        return
    rows = [(spec.name, f.component, str(f.path) if f.path else "missing", f.source or "-")
            for spec, found in entries for f in found]
    _table(None, ("model", "component", "path", "where"), rows)
