"""What `--help` shows, made exact once for the whole command tree (app.py calls `tidy` on the root group).

- Help texts are plain text, never Rich markup: Typer renders them with `rich_markup_mode="rich"`, where
  `maisi[onnx]` would lose `[onnx]` as an unknown style tag. Every help text is escaped here, so sources write
  brackets as they are (no `\\[`), and a plugin's help reads as written too.
- Values are named in plain words (`PATH`, `N`, `TEXT`, `WxHxD`) instead of Typer's types (`<path>`, `<int range>`,
  `<list[str]>`); flags show none. An option or argument that sets its own metavar keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from rich.markup import escape

# Options whose value has a shape the type does not say; by the option's long name, in any command.
NAMED_VALUES = {
    "--size": "WxHxD",
    "--spacing": "XxYxZ",
    "--shard": "I/N",
    "--model": "NAME",
    "--profile": "NAME",
    "--device": "DEVICE",
    "--revision": "REV",
    "--memory": "SIZE",
    "--component": "NAME",
}

TYPE_WORDS = {int: "N", float: "NUMBER", str: "TEXT", bool: "BOOL", Path: "PATH"}


def value_word(param: Any) -> str:
    """The plain word for a parameter's value: its named shape, else its type's word (a list: its item's)."""
    for name in getattr(param, "opts", ()):
        if name in NAMED_VALUES:
            return NAMED_VALUES[name]
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if descriptor is not None and descriptor.is_choice and descriptor.choices:
        return "|".join(str(getattr(c, "value", c)) for c in descriptor.choices)
    if descriptor is not None and descriptor.is_path:
        return "PATH"
    if getattr(descriptor, "is_list", False) and get_args(annotation):
        annotation = get_args(annotation)[0]
    return TYPE_WORDS.get(annotation, "VALUE")


def plain(text: str) -> str:
    """`text` escaped for Rich markup; a `\\[` written for Rich markup (the older habit) stays one bracket."""
    return escape(text.replace("\\[", "["))


def tidy_param(param: Any) -> None:
    if getattr(param, "_maisi_tidied", False):
        return
    param._maisi_tidied = True
    if param.help:
        param.help = plain(param.help)
    if param.param_type_name == "option":
        if param.is_flag or getattr(getattr(param, "type_descriptor", None), "annotation", None) is bool:
            param.metavar = ""  # a flag takes no value: nothing to show
        elif param.metavar is None:
            param.metavar = value_word(param)
        return
    if param.param_type_name == "argument":
        if param.metavar is None:
            param.metavar = param.name.upper()
        word = value_word(param)
        param.display_type_rich = lambda ctx, word=word: word  # Typer shows the type, not the metavar, for an argument


def tidy(command: Any) -> Any:
    """Escape every help text and name every value of `command` and its subcommands, once; returns `command`."""
    if getattr(command, "_maisi_tidied", False):
        return command
    command._maisi_tidied = True
    for attribute in ("help", "short_help", "epilog"):
        text = getattr(command, attribute, None)
        if text:
            setattr(command, attribute, plain(text))
    made_params = command.get_params  # with the options Click and Typer add per context (--help, completion)

    def get_params(ctx: Any) -> list:
        params = made_params(ctx)
        for param in params:
            tidy_param(param)
        return params

    command.get_params = get_params
    for sub in getattr(command, "commands", {}).values():
        tidy(sub)
    return command
