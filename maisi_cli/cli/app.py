"""The `maisi` command: assembles the command groups and turns MaisiError into one red line and its exit code.

Kept light: nothing here imports torch or MONAI, so `maisi --help` and shell completion answer at once.
"""

from __future__ import annotations

import os
import sys


def default_wait_policy(argv: list[str]) -> str | None:
    """The OMP_WAIT_POLICY maisi sets when the user has not: PASSIVE, except for `maisi train …` (None: libgomp's
    default, a short spin before sleeping).

    OpenMP threads that spin while waiting made about one CPU run in three 10x slower on shared 2-core machines, and
    passive waiting costs inference 3-10 % (bench/omp_wait_policy.py). A training step is hundreds of small kernels,
    each waking the threads: there PASSIVE cost up to 2.2x per step (bench/omp_wait_policy_train.py).
    """
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the root options take no values
    return None if command == "train" else "PASSIVE"


# Must be set before torch loads; a value the user set is kept.
if (_policy := default_wait_policy(sys.argv[1:])) is not None:
    os.environ.setdefault("OMP_WAIT_POLICY", _policy)

import traceback  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from maisi_cli import __version__  # noqa: E402
from maisi_cli.cli import render  # noqa: E402
from maisi_cli.errors import MaisiError  # noqa: E402


class MaisiGroup(TyperGroup):
    """Root group: every command's MaisiError ends here as one line on stderr and the error's exit code."""

    def invoke(self, ctx: typer.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except MaisiError as failure:
            output = ctx.obj if isinstance(ctx.obj, render.Output) else render.Output()
            if output.debug:
                traceback.print_exc()
            render.error(str(failure))
            raise typer.Exit(failure.exit_code) from None


app = typer.Typer(
    cls=MaisiGroup,
    name="maisi",
    help="Generate CT volumes with their segmentation masks using NVIDIA MAISI.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"maisi {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Print exactly one JSON document on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no warnings; errors still print."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    ctx.obj = render.Output(json=json_output, quiet=quiet, debug=debug)
    from maisi_cli import plugins

    output = ctx.obj
    plugins.warnings_to(lambda message: render.warning(message, output))  # plugin problems: one line each


def _register() -> None:
    from maisi_cli.cli import data, fid, generate, labels, models, plugins, profiles, qc

    app.command("generate", help=generate.HELP)(generate.generate)
    app.command("models", help=models.HELP)(models.models)
    app.command("qc", help=qc.HELP)(qc.qc)
    from maisi_cli.cli import preview

    app.command("preview", help=preview.HELP)(preview.preview)
    app.command("fid", help=fid.HELP)(fid.fid)
    app.command("labels", help=labels.HELP)(labels.labels)
    app.add_typer(profiles.app, name="profiles")
    app.add_typer(data.app, name="data")
    from maisi_cli.cli import weights

    app.add_typer(weights.app, name="weights")
    from maisi_cli.cli import train

    app.add_typer(train.app, name="train")
    from maisi_cli.cli import export

    app.add_typer(export.app, name="export")
    app.command("plugins", help=plugins.HELP)(plugins.plugins_command)
    _mount_plugin_commands()


def _mount_plugin_commands() -> None:
    """Each `maisi.commands` entry point's Typer under its entry-point name; a taken name or a broken Typer is
    refused with one warning, and the built-in commands stay as they are."""
    from maisi_cli import plugins

    owner = {c.name: "maisi" for c in app.registered_commands} | {g.name: "maisi" for g in app.registered_groups}
    for record, obj in plugins.loaded("commands"):
        if not isinstance(obj, typer.Typer):
            plugins.fail(record, f"gave a {type(obj).__name__}, not a typer.Typer")
            continue
        if record.name in owner:
            plugins.refuse(record, [(record.name, f"the command name is taken by {owner[record.name]}")])
            continue
        try:
            typer.main.get_command(obj)  # a Typer that cannot be built would break every command
        except Exception as error:
            plugins.fail(record, f"is not a usable Typer: {type(error).__name__}: {error}")
            continue
        app.add_typer(obj, name=record.name, rich_help_panel="Plugin commands")
        owner[record.name] = f"plugin {record.plugin}"
        if record.name not in record.registered:  # the app assembled again (tests reload it)
            record.registered.append(record.name)


_register()


def main() -> None:
    app()
