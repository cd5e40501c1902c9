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

_PROBE = """
import json, sys
import typer
from bitplan.app.cli import app

def run(*args):
    try:
        app(list(args), prog_name="bitplan")
    except SystemExit:
        pass

for args in json.loads(sys.argv[1]):
    if args == ["EVERY-COMMAND"]:
        root = typer.main.get_command(app)
        for name, command in root.commands.items():
            run(name, "--help")
            for sub in getattr(command, "commands", {}):
                run(name, sub, "--help")
    else:
        run(*args)
print(json.dumps(sorted(name for name in json.loads(sys.argv[2]) if name in sys.modules)))
"""


def _loaded_after(*runs: list[str]) -> list[str]:
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(runs)), json.dumps(HEAVY)],
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
        # Port 9 (discard) refuses the connection: the command runs to its one-line error.
        pytest.param([["status", "some-job", "--url", "http://127.0.0.1:9"]], id="status"),
    ],
)
def test_the_cli_starts_without_the_heavy_stack(runs: list[list[str]]) -> None:
    assert _loaded_after(*runs) == []


def test_the_probe_sees_heavy_imports() -> None:
    """The premise: a command that does load the library is seen loading it."""
    assert "torch" in _loaded_after(["formats"], ["apply", "missing.pt", "missing.json", "-o", "x"])


def test_the_client_imports_light() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", f"import sys, bitplan.app.client; print([m for m in {HEAVY!r} "
         "if m in sys.modules])"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert probe.stdout.strip() == "[]"
