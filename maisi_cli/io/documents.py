"""Read one JSON or TOML document from a file the user named, with the same three messages everywhere: the file
cannot be read, it does not parse (with line and column), or its top level is the wrong type. No Typer, no rich."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from maisi_cli.errors import UsageError

# tomllib (3.11) puts the position only into the message: "<msg> (at line L, column C)" or "(at end of document)".
_TOML_POSITION = re.compile(r"^(?P<msg>.*?) \((?:at line (?P<line>\d+), column (?P<column>\d+)|at end of document)\)$",
                            re.DOTALL)
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def read_document(path: Path, option: str, *, kind: Literal["json", "toml"] | None = None,
                  expect: type | tuple[type, ...] = dict, shape: str | None = None,
                  error: type[Exception] = UsageError) -> Any:
    """The parsed document at `path`: JSON or TOML (`kind`; None picks by suffix: `.toml` is TOML, anything else
    JSON), whose top level must be an instance of `expect`. Each failure raises `error` with a one-line message
    that starts with `option` (the flag or field the path came from) and names the path:

        OPTION: cannot read 'PATH' (REASON)
        OPTION: 'PATH' is not valid JSON (line L, column C): PROBLEM
        OPTION: 'PATH' must hold SHAPE, not a list

    `shape` words what the file should hold (the fix); by default "a JSON object", "a TOML table", "a JSON list"."""
    kind = kind or ("toml" if path.suffix.lower() == ".toml" else "json")
    label = kind.upper()
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as problem:
        raise error(f"{option}: cannot read '{path}' ({problem.strerror or type(problem).__name__})") from None
    except UnicodeDecodeError as problem:
        raise error(f"{option}: cannot read '{path}' (not UTF-8 text: byte 0x{problem.object[problem.start]:02x} "
                    f"at offset {problem.start}); save it as UTF-8 {label}") from None
    try:
        document = tomllib.loads(text) if kind == "toml" else json.loads(text)
    except json.JSONDecodeError as problem:
        raise error(f"{option}: '{path}' is not valid JSON (line {problem.lineno}, column {problem.colno}): "
                    f"{problem.msg}") from None
    except tomllib.TOMLDecodeError as problem:
        where, message = _toml_position(problem, text)
        raise error(f"{option}: '{path}' is not valid TOML ({where}): {message}") from None
    if not isinstance(document, expect):
        wanted = shape or _default_shape(expect, label)
        found = _TYPE_NAMES.get(type(document), type(document).__name__)
        raise error(f"{option}: '{path}' must hold {wanted}, not {found}")
    return document


def _toml_position(problem: tomllib.TOMLDecodeError, text: str) -> tuple[str, str]:
    """("line L, column C", the message without its position) of a TOML parse error; "at end of document" becomes
    the document's last line and the column after its last character."""
    if hasattr(problem, "lineno"):  # Python 3.14+ carries the position as attributes
        return f"line {problem.lineno}, column {problem.colno}", problem.msg
    match = _TOML_POSITION.match(str(problem))
    if match is None:
        return "position unknown", str(problem)
    if match["line"] is None:  # at end of document
        line, column = text.count("\n") + 1, len(text) - text.rfind("\n")
        return f"line {line}, column {column}", match["msg"]
    return f"line {match['line']}, column {match['column']}", match["msg"]


def _default_shape(expect: type | tuple[type, ...], label: str) -> str:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    words = {dict: "a TOML table" if label == "TOML" else "a JSON object", list: f"a {label} list"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)
