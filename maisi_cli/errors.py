"""User-facing errors. Each message names the field at fault and the fix; the CLI prints it as one line."""

from __future__ import annotations


def first_validation_problem(error) -> tuple[str, str]:
    """(dotted field, message in maisi's words) of a pydantic ValidationError's first problem, for a one-line
    message."""
    first = error.errors()[0]
    return ".".join(str(p) for p in first["loc"]), validation_message(first)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# pydantic's message ("Field required", "Input should be greater than or equal to 1") per error type, as maisi says
# it; a type not listed (a validator's own message) keeps its text.
_MESSAGES = {
    "missing": lambda value, ctx: "required",
    "extra_forbidden": lambda value, ctx: "not a setting this takes; remove it",
    "int_parsing": lambda value, ctx: f"{_shown(value)} is not a whole number",
    "int_type": lambda value, ctx: f"{_shown(value)} is not a whole number",
    "int_from_float": lambda value, ctx: f"{_shown(value)} is not a whole number",
    "float_parsing": lambda value, ctx: f"{_shown(value)} is not a number",
    "float_type": lambda value, ctx: f"{_shown(value)} is not a number",
    "bool_parsing": lambda value, ctx: f"{_shown(value)} is not true or false",
    "bool_type": lambda value, ctx: f"{_shown(value)} is not true or false",
    "string_type": lambda value, ctx: f"{_shown(value)} is not text",
    "path_type": lambda value, ctx: f"{_shown(value)} is not a path",
    "list_type": lambda value, ctx: f"{_shown(value)} is not a list",
    "tuple_type": lambda value, ctx: f"{_shown(value)} is not a list",
    "dict_type": lambda value, ctx: f"{_shown(value)} is not a table/object",
    "model_type": lambda value, ctx: f"{_shown(value)} is not a table/object",
    "greater_than_equal": lambda value, ctx: f"{_shown(value)} is too small; use {ctx['ge']} or more",
    "greater_than": lambda value, ctx: f"{_shown(value)} is too small; use more than {ctx['gt']}",
    "less_than_equal": lambda value, ctx: f"{_shown(value)} is too large; use {ctx['le']} or less",
    "less_than": lambda value, ctx: f"{_shown(value)} is too large; use less than {ctx['lt']}",
    "literal_error": lambda value, ctx: f"{_shown(value)} is not one of {ctx['expected']}",
    "too_short": lambda value, ctx: f"needs at least {ctx['min_length']} item(s), got {ctx['actual_length']}",
    "too_long": lambda value, ctx: f"takes at most {ctx['max_length']} item(s), got {ctx['actual_length']}",
}


def validation_message(problem: dict) -> str:
    """One pydantic problem (an item of ValidationError.errors()) as maisi words it."""
    words = _MESSAGES.get(problem["type"])
    if words is not None:
        try:
            return words(problem.get("input"), problem.get("ctx") or {})
        except KeyError:  # a context pydantic did not give: its own words
            pass
    message = str(problem["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def missing_option(field: str, give: str | None = None, config_file=None):
    """The UsageError for a required setting left out: `--out: required; give the output folder, e.g. --out runs/vae`
    (`give`: what to give; with a --config file, where else it may be set)."""
    flag = f"--{field.replace('_', '-')}"
    place = f" (or set {field} in --config {config_file})" if config_file is not None else ""
    return UsageError(f"{flag}: required; give {give or flag + ' VALUE'}{place}")


class MaisiError(Exception):
    """A failure the user can act on. `exit_code` follows cli.md: 1 runtime, 2 usage, 3 quality check."""

    exit_code = 1


class UsageError(MaisiError):
    """The request itself is wrong (a bad option value, an unknown name): exit code 2."""

    exit_code = 2


class WeightsError(MaisiError):
    """A weight file is missing, corrupt, or does not fit the network."""


class MaskError(MaisiError):
    """A condition mask cannot be read or used."""


class OutputError(MaisiError):
    """The output folder cannot be written."""


class NoSpaceError(OutputError):
    """The disk (or quota) filled up while writing an output."""


class GenerationError(MaisiError):
    """The networks ran but produced something unusable."""


class StatisticsError(MaisiError):
    """The HU statistics file for the quality check cannot be read or lacks a field."""


class QualityCheckFailed(MaisiError):
    """A quality check ran and failed (`maisi qc`, `maisi generate --strict-qc`): exit code 3."""

    exit_code = 3
