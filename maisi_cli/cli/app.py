"""The `maisi` command: assembles the command groups and turns MaisiError into one red line and its exit code.

Kept light: nothing here imports torch or MONAI, so `maisi --help` and shell completion answer at once.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting made about one CPU run in three 10x slower on shared 2-core machines;
# passive waiting removed that (bench/omp_wait_policy.py). It must be set before torch loads; users can override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def _register() -> None:
    from maisi_cli.cli import data, fid, generate, labels, models, profiles, qc

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


_register()


def main() -> None:
    app()
