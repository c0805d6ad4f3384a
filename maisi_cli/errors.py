"""User-facing errors. Each message names the field at fault and the fix; the CLI prints it as one line."""

from __future__ import annotations


def first_validation_problem(error) -> tuple[str, str]:
    """(dotted field, message) of a pydantic ValidationError's first problem, for a one-line message."""
    first = error.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


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
