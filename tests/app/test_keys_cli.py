"""``bitplan keys list`` shows keys without their secrets; ``keys revoke ID|NAME`` makes a key
get 401 from then on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.app.settings import Settings, get_settings
from tests.app._api_fixtures import api_client

runner = CliRunner()


@pytest.fixture
def db_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """An upgraded SQLite database named by BITPLAN_* variables, as an operator's shell has."""
    url = f"sqlite:///{tmp_path / 'service.db'}"
    monkeypatch.setenv("BITPLAN_DATABASE_URL", url)
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    yield Settings(database_url=url, data_dir=tmp_path / "data", auth="on")
    get_settings.cache_clear()


def _create(name: str) -> str:
    made = runner.invoke(app, ["keys", "create", name])
    assert made.exit_code == 0, made.output
    return made.stdout.strip()


def _listing() -> dict[str, list[str]]:
    """``keys list`` rows by id: [name, created, revoked]."""
    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "CREATED", "REVOKED"]
    rows = {}
    for line in lines:
        name, key_id, *rest = line.split(maxsplit=2)
        rows[key_id] = [name, rest[0]]
    return rows


def _status(settings: Settings, key: str) -> int:
    with api_client(settings) as client:
        return client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code


def test_list_shows_every_key_but_never_a_secret(db_env: Settings) -> None:
    first, second = _create("ci"), _create("alice")
    listed = runner.invoke(app, ["keys", "list"])
    assert first not in listed.output and second not in listed.output
    rows = _listing()
    assert sorted(name for name, _ in rows.values()) == ["alice", "ci"]
    for _, times in rows.values():
        assert times.endswith(" -") and "UTC" in times  # created, never revoked


def test_an_empty_listing_says_how_to_create_a_key(db_env: Settings) -> None:
    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0 and listed.stdout == ""
    assert "bitplan keys create" in listed.stderr


def test_revoke_by_name_and_by_id_gives_401(db_env: Settings) -> None:
    by_name, by_id, kept = _create("ci"), _create("bob"), _create("carol")
    bob_id = next(key_id for key_id, (name, _) in _listing().items() if name == "bob")
    assert _status(db_env, by_name) == 200
    assert runner.invoke(app, ["keys", "revoke", "ci"]).exit_code == 0
    done = runner.invoke(app, ["keys", "revoke", bob_id])
    assert done.exit_code == 0 and bob_id in done.stderr
    assert _status(db_env, by_name) == 401
    assert _status(db_env, by_id) == 401
    assert _status(db_env, kept) == 200
    revoked = {name for name, times in _listing().values() if not times.endswith(" -")}
    assert revoked == {"ci", "bob"}
    again = runner.invoke(app, ["keys", "revoke", "ci"])
    assert again.exit_code == 0 and "already revoked" in again.stderr


def test_revoke_refuses_an_unknown_or_ambiguous_name(db_env: Settings) -> None:
    first, second = _create("shared"), _create("shared")
    unknown = runner.invoke(app, ["keys", "revoke", "nobody"])
    assert unknown.exit_code == 2 and "bitplan keys list" in unknown.stderr
    ambiguous = runner.invoke(app, ["keys", "revoke", "shared"])
    assert ambiguous.exit_code == 2 and "revoke by id" in ambiguous.stderr
    assert _status(db_env, first) == 200 and _status(db_env, second) == 200
