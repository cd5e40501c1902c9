"""The CLI starts without the heavy stack: ``bitplan --help``, every command's ``--help`` and
``bitplan status`` import no torch, pandas, Optuna, SQLAlchemy, web server or model library.

Checked in a fresh interpreter through ``sys.modules`` (deterministic, unlike a timing), since
the test process itself has long imported all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from bitplan.app.cli import COMMANDS, app

# What a command that only prints help or asks a server for a job's state must not load.
HEAVY = (
    "torch",
    "pandas",
    "numpy",
    "scipy",
    "sklearn",
    "optuna",
    "sqlalchemy",
    "alembic",
    "fastapi",
    "uvicorn",
    "transformers",
    "safetensors",
)

# Port 9 (discard) refuses the connection: the command runs to its one-line error.
_STATUS = ["status", "some-job", "--url", "http://127.0.0.1:9"]
# What `bitplan --help` and `bitplan status` leave to the commands that need it: JobSpec
# (pydantic; the job options' defaults) and the settings (pydantic-settings; the operator
# commands). --help loads no pydantic and no HTTP client at all; running a command does load
# pydantic, as Typer converts the arguments with it.
_LAZY = ("bitplan.search.spec", "pydantic_settings", "bitplan.app.settings")

_PROBE = """
import json, sys
from bitplan.app.cli import COMMANDS, app

def run(*args):
    try:
        app(list(args), prog_name="bitplan")
    except SystemExit:
        pass

for args in json.loads(sys.argv[1]):
    if args == ["EVERY-COMMAND"]:
        for name, command in COMMANDS.items():
            run(name, "--help")
            for sub in getattr(command.load(name), "commands", {}):  # db, keys: groups
                run(name, sub, "--help")
    else:
        run(*args)
print(json.dumps(sorted(name for name in json.loads(sys.argv[2]) if name in sys.modules)))
"""


def _loaded_after(*runs: list[str], watched: tuple[str, ...] = HEAVY) -> list[str]:
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(runs)), json.dumps(watched)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(probe.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "runs",
    [
        pytest.param([], id="import"),
        pytest.param([["--help"], ["EVERY-COMMAND"]], id="help"),
        pytest.param([_STATUS], id="status"),
    ],
)
def test_the_cli_starts_without_the_heavy_stack(runs: list[list[str]]) -> None:
    assert _loaded_after(*runs) == []


@pytest.mark.parametrize(
    ("runs", "not_loaded"),
    [
        pytest.param([["--help"]], (*_LAZY, "pydantic", "httpx"), id="help"),
        pytest.param([_STATUS], _LAZY, id="status"),
    ],
)
def test_help_and_status_load_only_what_they_use(
    runs: list[list[str]], not_loaded: tuple[str, ...]
) -> None:
    assert _loaded_after(*runs, watched=not_loaded) == []


def test_every_command_is_listed_and_loads() -> None:
    """The list that --help shows is the list of commands, each loadable under its name."""
    root = typer.main.get_command(app)
    assert root.list_commands(None) == list(COMMANDS)  # type: ignore[attr-defined,arg-type]
    for name, command in COMMANDS.items():
        loaded = command.load(name)
        assert loaded.name == name and (loaded.help or loaded.commands), name


def test_the_probe_sees_heavy_imports() -> None:
    """The premise: a command that does load the library is seen loading it (and one that
    needs JobSpec or the settings, those)."""
    assert "torch" in _loaded_after(["formats"], ["apply", "missing.pt", "missing.json", "-o", "x"])
    assert _loaded_after(["search", "--help"], ["serve", "--help"], watched=_LAZY) == sorted(_LAZY)


def test_the_client_imports_light() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", f"import sys, bitplan.app.client; print([m for m in {HEAVY!r} "
         "if m in sys.modules])"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert probe.stdout.strip() == "[]"
