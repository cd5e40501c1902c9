"""The orphan sweep: partial uploads, extraction folders and row-less files go; recorded files,
and anything younger than the grace, stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.settings import Settings
from bitplan.app.sweeper import PERIODIC_GRACE_S, sweep_settings
from tests.app._api_fixtures import api_client


def _touch(path: Path, *, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def _leftovers(settings: Settings, *, age_s: float) -> list[Path]:
    owner = settings.upload_dir / "datasets" / "public"
    unzip = settings.cache_dir / "unzipped" / ".unzip-abc"
    validate = settings.cache_dir / ".validate-abc"
    _touch(unzip / "weights.bin", age_s=age_s)
    _touch(validate / "unzipped" / "x" / "config.json", age_s=age_s)
    for folder in (unzip, validate):
        os.utime(folder, (time.time() - age_s, time.time() - age_s))
    return [
        _touch(owner / ".upload-123.part", age_s=age_s),
        _touch(owner / ("0" * 64 + ".jsonl"), age_s=age_s),  # stored, but no row
        unzip,
        validate,
    ]


def _sweep(settings: Settings, *, min_age_s: float) -> list[Path]:
    engine = make_engine(settings.database_url)
    try:
        return sweep_settings(settings, make_sessionmaker(engine), min_age_s=min_age_s)
    finally:
        engine.dispose()


def test_sweep_removes_orphans_and_keeps_recorded_uploads(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with api_client(settings) as client:
        kept = client.post("/v1/datasets", files={"file": ("a.jsonl", b'{"text": "hi"}\n')})
        assert kept.status_code == 201
    orphans = _leftovers(settings, age_s=PERIODIC_GRACE_S + 10)
    with caplog.at_level("INFO", logger="bitplan.app.sweeper"):
        removed = _sweep(settings, min_age_s=0)
    assert sorted(removed) == sorted(orphans)
    assert not any(path.exists() for path in orphans)
    assert f"sweep removed {len(orphans)} orphan(s)" in caplog.text
    stored = list(settings.upload_dir.rglob("*.jsonl"))
    assert [p.name for p in stored] == [f"{kept.json()['sha256']}.jsonl"]


def test_sweep_spares_what_is_younger_than_the_grace(settings: Settings) -> None:
    fresh = _leftovers(settings, age_s=0)
    assert _sweep(settings, min_age_s=3600) == []
    assert all(path.exists() for path in fresh)


def test_api_start_up_sweeps(settings: Settings) -> None:
    orphans = _leftovers(settings, age_s=PERIODIC_GRACE_S + 10)
    with api_client(settings) as client:
        assert isinstance(client, TestClient)
    assert not any(path.exists() for path in orphans)


def test_start_up_sweep_spares_a_workers_extraction_in_flight(settings: Settings) -> None:
    """Extraction folders belong to workers, which outlive an API restart: even a sweep with no
    grace (start-up) leaves a recent one, while the API's own leftovers go."""
    upload, stored, unzip, validate = _leftovers(settings, age_s=10)
    removed = _sweep(settings, min_age_s=0)
    assert sorted(removed) == sorted([upload, stored, validate])
    assert unzip.exists()
