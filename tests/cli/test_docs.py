"""docs/cli.md is generated from the command (`make docs`); it must still describe the command as it is."""

import html
import re
from pathlib import Path

import typer.main

from freelunch_cli.cli import app

CLI_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## `freelunch (\w+)`$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_command_reference_matches_the_command():
    """Every command has a section naming each of its options with its help and default, and no option it lacks.
    Compared by content, not layout, so that a new Typer release formatting the page differently does not fail it."""
    sections = _sections(html.unescape(CLI_DOC.read_text()))
    commands = typer.main.get_command(app).commands
    assert set(sections) == set(commands), "run `make docs`"
    for name, command in commands.items():
        text = " ".join(sections[name].split())
        flags = {"--help"}
        for param in command.params:
            flags |= {f for f in param.opts + param.secondary_opts if f.startswith("--")}
            for f in param.opts:
                assert f in text, f"{name} {f} is not in docs/cli.md: run `make docs`"
            if getattr(param, "help", None):
                assert " ".join(param.help.split()) in text, f"{name} {param.name}: its help changed; run `make docs`"
            if (
                param.default not in (None, False, [], ())
                and not param.required
                and getattr(param, "show_default", True) is not False
            ):
                # a flag pair on by default shows the flag's name (--symmetric/--asymmetric: "default: symmetric")
                shown = param.opts[0].lstrip("-") if param.default is True and param.secondary_opts else param.default
                assert f"default: {shown}" in text, f"{name} {param.name}: its default changed; run `make docs`"
        documented = set(re.findall(r"`(?:-\w, )?(--[\w-]+)", sections[name]))
        assert documented <= flags, f"{name}: docs/cli.md names {documented - flags}, which the command lacks; run `make docs`"
