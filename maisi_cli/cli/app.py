"""The `maisi` command: assembles the command groups and turns MaisiError into one red line and its exit code.

Kept light: nothing here imports torch or MONAI, so `maisi --help` and shell completion answer at once.
"""

from __future__ import annotations

import contextlib
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

from maisi_cli.cli import terminal  # noqa: E402  (standard library only)

terminal.early_status(sys.argv)  # a slow command's status line now, before typer, rich and torch import

import errno  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

try:  # typer >= 0.20 carries its own copy of Click, whose exceptions its parser raises
    from typer._click import exceptions as click_errors  # noqa: E402
except ImportError:  # pragma: no cover - older typer: Click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]  # noqa: E402

from maisi_cli import __version__  # noqa: E402
from maisi_cli.cli import help_text, render  # noqa: E402
from maisi_cli.errors import MaisiError  # noqa: E402

# The root flags a user may also write after the command (`maisi generate … --quiet`): Click reads a group's options
# only before its command, so they are moved there. None of them takes a value.
ROOT_FLAGS = ("--json", "--quiet", "-q", "--debug")


@dataclass
class Request:
    """The command line as Click will read it, and the two root flags that decide how a failure is shown."""

    args: list[str] = field(default_factory=list)
    json: bool = False
    debug: bool = False
    command: list[str] = field(default_factory=lambda: ["maisi"])  # the command it names, for a help hint
    argv: list[str] = field(default_factory=list)  # the command line as written: an interrupted run's resume line
    interrupted: bool = False  # a Ctrl-C or SIGTERM came: the run is unwinding
    interrupted_in: Any = None  # the command's Click context when it came (what it was doing)
    started: float = 0.0  # time.time() when the command began


def read_request(root: Any, args: list[str]) -> Request:
    """Walk `args` as Click will: into each subcommand, an option that takes values keeps them (even `--out --json`),
    a command's own option of a root flag's name stays its own, and nothing after `--` moves. A root flag met after
    the command moves before it."""
    moved: list[str] = []
    kept: list[str] = []
    request = Request(argv=list(args))
    command, ctx = root, root.context_class(root, **root.context_settings)
    index = 0
    while index < len(args):
        word = args[index]
        index += 1
        if word == "--":
            kept += args[index - 1:]
            break
        if not word.startswith("-") or word == "-":
            kept.append(word)
            sub = command.get_command(ctx, word) if hasattr(command, "get_command") else None
            if sub is not None:
                command, ctx = sub, sub.context_class(sub, parent=ctx, info_name=word)
                request.command.append(word)
            continue
        option = option_named(command, ctx, word.split("=", 1)[0])
        if option is None and command is not root and word in ROOT_FLAGS:
            moved.append(word)
            request.json |= word == "--json"
            request.debug |= word == "--debug"
            continue
        kept.append(word)
        if option is None:
            continue
        request.json |= word == "--json" and option.is_flag  # the root's, or a command's own (they merge)
        request.debug |= word == "--debug" and command is root
        taken = 0 if "=" in word or option.is_flag or option.count else max(option.nargs, 1)
        kept += args[index:index + taken]
        index += taken
    request.args = moved + kept
    return request


def option_named(command: Any, ctx: Any, name: str) -> Any:
    """The command's option spelt `name` (help included), or None."""
    for param in command.get_params(ctx):
        if getattr(param, "param_type_name", "") == "option" and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def parameter_name(param: Any) -> str:
    """How the user wrote a parameter: an option's long name (`--num-samples`), an argument's METAVAR."""
    if getattr(param, "param_type_name", "") == "option":
        return max(param.opts, key=len)
    return param.metavar or param.name.upper()


def usage_line(failure: Any, request: Request) -> str:
    """One line for a Click usage error that names the option at fault and the fix."""
    command = failure.ctx.command_path if failure.ctx is not None else " ".join(request.command)
    see = f"see `{command} --help`"
    param = getattr(failure, "param", None)
    if isinstance(failure, click_errors.MissingParameter) and param is not None:
        name = parameter_name(param)
        if param.param_type_name == "option":
            return f"{name}: required; give {name} {param.metavar or 'VALUE'} ({see})"
        return f"{name}: missing argument; {see}"
    if isinstance(failure, click_errors.BadParameter) and param is not None:
        return f"{parameter_name(param)}: {failure.message}"
    if isinstance(failure, click_errors.NoSuchOption):
        near = sorted(failure.possibilities or ())
        fix = f"did you mean {' or '.join(near)}? ({see})" if near else see
        return f"{failure.option_name}: no such option of `{command}`; {fix}"
    return f"{failure.format_message()} ({see})"


def describe_failure(failure: BaseException, request: Request) -> tuple[str, str, int]:
    """(type, one-line message, exit code) of whatever ended a command."""
    if isinstance(failure, MaisiError):
        return type(failure).__name__, str(failure), failure.exit_code
    if isinstance(failure, click_errors.NoArgsIsHelpError):  # a bare group under --json (else Click shows help)
        return "UsageError", f"missing command; see `{failure.ctx.command_path} --help`", 2
    if isinstance(failure, click_errors.UsageError):
        return "UsageError", usage_line(failure, request), 2
    if isinstance(failure, click_errors.ClickException):
        return type(failure).__name__, failure.format_message(), failure.exit_code
    if isinstance(failure, terminal.Terminated) or isinstance(failure.__cause__, terminal.Terminated):
        return "Terminated", interruption_line("SIGTERM", request), 143
    if isinstance(failure, KeyboardInterrupt) or isinstance(failure.__cause__, KeyboardInterrupt):
        return "Interrupted", interruption_line("Ctrl-C", request), 130
    if isinstance(failure, typer.Abort):
        return "Aborted", "aborted", 1
    return ("InternalError", f"unexpected {type(failure).__name__}: {failure}; this is a bug: rerun with --debug to "
            "see the traceback, and please report it", 1)


def passes_through(failure: BaseException, request: Request) -> bool:
    """What Click itself must handle: an exit (help, --version, success), help for a bare group without --json,
    a closed pipe."""
    if isinstance(failure, (SystemExit, typer.Exit)):
        return True
    if isinstance(failure, click_errors.NoArgsIsHelpError):
        return not request.json
    return isinstance(failure, OSError) and failure.errno == errno.EPIPE


def exit_status(failure: BaseException) -> int:
    """The status a typer.Exit or SystemExit ends the process with (1 for a message); 0 for anything else."""
    if isinstance(failure, typer.Exit):
        return failure.exit_code
    if isinstance(failure, SystemExit):
        return failure.code if isinstance(failure.code, int) else int(failure.code is not None)
    return 0


def report(failure: BaseException, request: Request) -> NoReturn:
    """One red line on stderr (a traceback first with --debug), the --json document, the exit code."""
    kind, message, exit_code = describe_failure(failure, request)
    message = " ".join(message.split("\n"))
    if request.debug and not isinstance(failure, click_errors.UsageError):
        traceback.print_exception(failure)
    render.error(message)
    render.json_failure(kind, message, exit_code)
    raise typer.Exit(exit_code) from None


def interruption_line(signal_name: str, request: Request) -> str:
    """"interrupted (Ctrl-C)", with what the command had completed and the command line that resumes it."""
    from maisi_cli.cli.resume import interruption

    context = request.interrupted_in  # the command's own, or a group's when the signal came before it ran
    params = dict(context.params) if context is not None and context.info_name == request.command[-1] else {}
    return interruption(signal_name, request.command, params, request.argv, request.started)


@contextlib.contextmanager
def interrupt_handlers(request: Request):
    """While a command runs: Ctrl-C raises KeyboardInterrupt and SIGTERM `terminal.Terminated`, after noting the
    command's context (for the resume line); further signals are ignored while the run unwinds (locks released,
    temporary files removed) and says what it completed."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer: Click itself
        from click import get_current_context  # type: ignore[no-redef]

    def stop(signum: int, frame: Any) -> None:
        if request.interrupted:
            return
        request.interrupted = True
        request.interrupted_in = get_current_context(silent=True)
        raise terminal.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    try:
        previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: Python's own handling stays
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class MaisiGroup(TyperGroup):
    """Root group: root flags are read after the command too, and every failure ends here as one line on stderr
    (with --json also one document on stdout) and its exit code."""

    request = Request()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        help_text.tidy(self)  # help texts as written (no Rich markup), plain value names

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore
        self.request = read_request(self, list(sys.argv[1:] if args is None else args))
        self.request.started = time.time()
        terminal.facts.clear()
        run = render.json_run() if self.request.json else contextlib.nullcontext()
        try:
            with run, interrupt_handlers(self.request):
                return super().main(self.request.args, prog_name, complete_var, standalone_mode, **extra)
        finally:
            terminal.clear()  # the status line never outlives the command

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except BaseException as failure:
            if passes_through(failure, self.request):
                raise
            report(failure, self.request)

    def invoke(self, ctx: typer.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except BaseException as failure:
            code = exit_status(failure)
            if code:  # a command that chose its exit code itself: the --json document still says it failed
                render.json_failure("Exit", f"exit code {code}", code)
            if passes_through(failure, self.request):
                raise
            report(failure, self.request)


app = typer.Typer(
    cls=MaisiGroup,
    name="maisi",
    help="Generate CT volumes with their segmentation masks using NVIDIA MAISI.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(ctx: typer.Context, value: bool) -> None:
    if not value:
        return
    if isinstance(ctx.command, MaisiGroup) and ctx.command.request.json:
        render.print_json({"version": __version__})
    else:
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
    from maisi_cli.cli import convert

    app.command("convert", help=convert.HELP)(convert.convert)
    app.add_typer(profiles.app, name="profiles")
    app.add_typer(data.app, name="data")
    from maisi_cli.cli import weights

    app.add_typer(weights.app, name="weights")
    from maisi_cli.cli import train

    app.add_typer(train.app, name="train")
    from maisi_cli.cli import export

    app.add_typer(export.app, name="export")
    app.command("plugins", help=plugins.HELP)(plugins.plugins_command)
    from maisi_cli.cli import serve

    app.command("serve", help=serve.HELP)(serve.serve)
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
