"""A regular (non-editable) install holds one top-level package, ``bitplan``, and works alone.

The repository keeps ``app/``, ``search/``, ``sensitivity/`` and ``migrations/`` at its root; the
wheel must map them under ``bitplan`` and carry the Alembic files as package data, or an
installed service could not migrate its database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_NOT_SOURCE = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".bitplan")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source: setuptools' build/ folder keeps files that were
    deleted since the last build, so building in the checkout could pass on stale modules."""
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source") / "bitplan"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    (built,) = out.glob("bitplan-*.whl")
    return built


def test_wheel_has_one_top_level_package_and_the_migrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"bitplan"}
    for expected in (
        "bitplan/__init__.py",
        "bitplan/app/cli.py",
        "bitplan/search/frontier.py",
        "bitplan/sensitivity/formats.py",
        "bitplan/migrations/alembic.ini",
        "bitplan/migrations/env.py",
        "bitplan/migrations/script.py.mako",
        "bitplan/migrations/versions/0001_initial.py",
    ):
        assert expected in names
    for folder in ("app", "search", "sensitivity", "migrations"):
        for init in (ROOT / folder).rglob("__init__.py"):
            assert f"bitplan/{init.relative_to(ROOT).as_posix()}" in names, init
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bitplan = bitplan.app.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_copy_imports_migrates_and_runs_outside_the_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import importlib.util, sys\n"
        "import bitplan, bitplan.app.cli\n"
        f"assert bitplan.__file__.startswith({str(site)!r}), bitplan.__file__\n"
        "bare = ('app', 'search', 'sensitivity')\n"
        "assert all(importlib.util.find_spec(n) is None for n in bare)\n"
        "from bitplan.app.report import _environment, _static\n"
        "assert _environment().get_template('report.html.j2') and _static('report.css')\n"
        "from bitplan.app.db import upgrade_database\n"
        f"upgrade_database('sqlite:///{tmp_path / 'db.sqlite'}')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    import sqlite3

    tables = {
        row[0]
        for row in sqlite3.connect(tmp_path / "db.sqlite").execute(
            "SELECT name FROM sqlite_master WHERE type='table'"
        )
    }
    assert {"jobs", "bitplan_alembic_version"} <= tables
