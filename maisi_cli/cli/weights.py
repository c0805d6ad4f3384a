"""`maisi weights download|list|verify|import|path`: a model's repository files, their sha256 lock, offline import.
Also the single files of no model (engine/hub.py `EXTRACTOR_FILES`: radimagenet-resnet50, the `maisi fid` feature
extractor), but for import.

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


def _model(name: str, revision: Optional[str], hub_files: bool = False):
    """The model spec; `hub_files`: the command also takes an extractor file's name, so an unknown name lists those
    too."""
    from maisi_cli.engine.hub import EXTRACTOR_FILES, with_revision
    from maisi_cli.errors import UsageError
    from maisi_cli.models import get_model

    try:
        spec = get_model(name)
    except UsageError as error:
        message = str(error).replace("--model:", "MODEL:", 1)
        if hub_files and "unknown model" in message:
            message += f"; or a feature extractor: {', '.join(EXTRACTOR_FILES)}"
        raise UsageError(message) from None
    return with_revision(spec, revision)


def _models(name: Optional[str], revision: Optional[str], with_repository: bool = False) -> list:
    from maisi_cli.engine.hub import with_revision
    from maisi_cli.models import list_models

    if name is not None:
        return [_model(name, revision, hub_files=True)]
    return [with_revision(s, revision) for s in list_models() if s.hf_repo or not with_repository]


def _targets(name: Optional[str], revision: Optional[str], with_repository: bool = False) -> list[tuple]:
    """(name, hf_repo, revision, [RepoFile]) of what `list`, `path` and `verify` show: every model then every
    extractor file (no name), or the one named. `with_repository`: a model named must have one."""
    from maisi_cli.engine.hub import extractor_files, repo_files, require_repository

    items = extractor_files(name, revision)
    specs = [] if name is not None and items else _models(name, revision, with_repository)
    if with_repository:
        for spec in specs:
            require_repository(spec)
    return ([(s.name, s.hf_repo, s.hf_revision, repo_files(s)) for s in specs]
            + [(i.component, i.repo, i.revision, [i]) for i in items])


def _size(size: Optional[int]) -> str:
    from maisi_cli.engine.hub import decimal_size

    return "-" if size is None else decimal_size(size)


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


def _licence_line(name: str, repo: str, licence: Optional[str], output: render.Output) -> None:
    licence = licence or f"see the Hugging Face repository {repo}"
    _notice(f"Licence of the {name} files: {licence}", output)


def _show_results(name: str, repo: str, revision: str, results: list, output: render.Output, **extra) -> None:
    """The files a download or an import handled: one JSON document, or a table and the lock's path."""
    from maisi_cli.engine.store import lock_path

    lock = lock_path(repo, revision)
    if output.json:
        render.print_json({"model": name, "repo": repo, "revision": revision, **extra, "lock": str(lock),
                           "files": [r.document() for r in results]})
        return
    if output.quiet:
        return
    rows = [(r.component, r.repo_name, r.status, _size(r.size), _short(r.sha256), r.lock or "-") for r in results]
    _table(f"{name}: {repo}@{revision}", ("component", "file", "status", "size", "sha256", "lock"), rows)
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
    from maisi_cli.engine.hub import (
        download,
        extractor_file,
        repo_files,
        require_repository,
    )
    from maisi_cli.errors import UsageError

    output = render.output_of(ctx.obj, json_flag)
    item = extractor_file(model, revision)
    if item is not None:  # one file, same cache, lock and output as a model's files
        if component or models_only:
            flag = "--component" if component else "--models-only"
            raise UsageError(f"{flag}: {item.component} is a single file; drop {flag}")
        name, repo, at, licence, files = item.component, item.repo, item.revision, item.licence, [item]
    else:
        spec = _model(model, revision, hub_files=True)
        repo = require_repository(spec)
        files = repo_files(spec, component, models_only)
        name, at, licence = spec.name, spec.hf_revision, spec.licence
    _licence_line(name, repo, licence, output)
    with render.progress(output) as on_progress:
        results = download(files, force=force, on_progress=on_progress)
    _show_results(name, repo, at, results, output, licence=licence)


def _located(name: Optional[str], weights_dir: Optional[Path], revision: Optional[str]) -> list:
    """(name, hf_repo, revision, [Location]) of each model, then each extractor file (see `_targets`)."""
    from maisi_cli.engine.hub import locations

    return [(shown, repo, at, locations(files, weights_dir)) for shown, repo, at, files in _targets(name, revision)]


@app.command("list")
def list_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model name, alias or spec .json, or radimagenet-resnet50 "
                                          "(default: every model, then radimagenet-resnet50)."),
    weights_dir: Optional[Path] = WEIGHTS_DIR_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """List a model's files (or radimagenet-resnet50, the `maisi fid` extractor): present or missing, size, whether
    their sha256 is locked."""
    from maisi_cli.engine.hub import expected_sizes, size_text

    output = render.output_of(ctx.obj, json_flag)
    entries = _located(model, weights_dir, revision)
    missing = [f for _, _, _, found in entries for f in found if f.path is None]
    # A missing file's size is what its download costs: from the lock, the spec, else the hub (unknown offline).
    expected = dict(zip(map(id, missing), expected_sizes([f.file for f in missing])))
    if output.json:
        render.print_json({"models": [
            {"name": name, "hf_repo": repo, "revision": at,
             "files": [{**f.document(), **({"download_size": expected[id(f)].bytes,
                                            "size_source": expected[id(f)].source} if f.path is None else {})}
                       for f in found]}
            for name, repo, at, found in entries]})
        return
    rows = [(name, f.component, f.repo_name, "present" if f.path else "missing",
             _size(f.size) if f.path else f"{size_text(expected[id(f)])} to download",
             "yes" if f.locked else "no", f.source or "-") for name, _, _, found in entries for f in found]
    _table(None, ("model", "component", "file", "status", "size", "locked", "where"), rows)
    total = sum(size.bytes or 0 for size in expected.values())
    unknown = sum(size.bytes is None for size in expected.values())
    if missing and not output.quiet:
        render.info(f"{len(missing)} file(s) missing: {_size(total) if total else ''}"
                    f"{' + ' if total and unknown else ''}{f'{unknown} of unknown size' if unknown else ''} to "
                    "download (`maisi weights download MODEL`)", output)


@app.command("verify")
def verify_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model name, alias or spec .json, or radimagenet-resnet50 "
                                          "(default: every model, then radimagenet-resnet50)."),
    revision: Optional[str] = REVISION_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Re-hash every file maisi manages (radimagenet-resnet50 included) and compare it with the lock; exit 1 on a
    mismatch or on a locked file that is missing."""
    from maisi_cli.engine.hub import mismatch_error, verify

    output = render.output_of(ctx.obj, json_flag)
    targets = _targets(model, revision, with_repository=True)
    hashed: dict = {}
    checked = []  # (name, hf_repo, revision, results, error)
    with render.progress(output) as on_progress:
        for name, repo, at, files in targets:
            results = verify(files, on_progress, hashed)
            checked.append((name, repo, at, results, mismatch_error(results)))
    if output.json:
        render.print_json({"models": [
            {"name": name, "hf_repo": repo, "revision": at, "ok": error is None,
             "error": str(error) if error is not None else None,
             "files": [r.document() for r in results]} for name, repo, at, results, error in checked]})
    else:
        rows = [(name, r.component, r.repo_name, r.where or "-",
                 "missing (locked)" if r.status == "missing" and r.expected else r.status, _short(r.sha256))
                for name, _, _, results, _ in checked for r in results]
        _table(None, ("model", "component", "file", "where", "status", "sha256"), rows)
    for *_, error in checked:
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
    _licence_line(spec.name, repo, spec.licence, output)
    with render.progress(output) as on_progress:
        results = import_folder(folder, spec, on_progress)
    _show_results(spec.name, repo, spec.hf_revision, results, output)


@app.command("path")
def path_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model name, alias or spec .json, or radimagenet-resnet50 "
                                          "(default: every model, then radimagenet-resnet50)."),
    weights_dir: Optional[Path] = WEIGHTS_DIR_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    json_flag: bool = JSON_OPTION,
) -> None:
    """Print where each file of a model (or radimagenet-resnet50, as `maisi fid` finds it) is read from (or
    "missing")."""
    output = render.output_of(ctx.obj, json_flag)
    entries = _located(model, weights_dir, revision)
    if output.json:
        render.print_json({"models": [
            {"name": name, "files": [{"component": f.component, "file": f.repo_name,
                                      "path": str(f.path) if f.path else None, "where": f.source}
                                     for f in found]} for name, _, _, found in entries]})
        return
    rows = [(name, f.component, str(f.path) if f.path else "missing", f.source or "-")
            for name, _, _, found in entries for f in found]
    _table(None, ("model", "component", "path", "where"), rows)
