"""One source per option: a stage config's dataclass field carries its default, its help and its flags.

The CLI builds each command's options from these fields (``freelunch_cli.cli``), so a default or a help text is
written once. Fields made with plain ``dataclasses.field`` (or none) are library-only settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

REQUIRED: Any = dataclasses.MISSING  # the default of an option that must be given


def option(default: Any, help: str, *flags: str, factory: Any = dataclasses.MISSING, cli_type: Any = None) -> Any:
    """A dataclass field exposed as a command-line option.

    ``default``: its default (``REQUIRED`` for none; with ``factory``, pass ``REQUIRED`` and the factory makes it).
    ``flags``: the option's names (default ``--field-name``); ``cli_type``: the type the command line parses when
    it differs from the field's (``--sparsity`` is read as text so that the stage can explain a bad value).
    Help texts must not contain square brackets: rich would read them as markup.
    """
    meta = {"help": help, "flags": flags, "cli_type": cli_type}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def cli_fields(config_cls) -> list[dataclasses.Field]:
    """The fields of a config class that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]
