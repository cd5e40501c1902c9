"""The container files agree with the code: compose has the api, worker and postgres services,
their commands are bitplan's, every BITPLAN_* variable is a Settings field whose value Settings
accepts, and the Dockerfile copies only paths that exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bitplan.app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with the environment empty: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _settings_of(service: dict[str, Any]) -> Settings:
    env = {name: _interpolate(str(value)) for name, value in service["environment"].items()}
    unknown = {
        name for name in env if name.removeprefix("BITPLAN_").lower() not in Settings.model_fields
    }
    assert not unknown, f"not Settings fields: {unknown}"
    fields = {name.removeprefix("BITPLAN_").lower(): value for name, value in env.items()}
    return Settings(**fields)


def test_compose_has_the_services_with_bitplan_commands(services: dict[str, Any]) -> None:
    assert {"api", "worker", "postgres"} <= set(services)
    assert services["api"]["command"][:2] == ["bitplan", "serve"]
    assert services["worker"]["command"][:2] == ["bitplan", "worker"]
    assert services["migrate"]["command"] == ["bitplan", "db", "upgrade"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def test_api_and_worker_settings_share_postgres_and_storage(services: dict[str, Any]) -> None:
    api, worker = _settings_of(services["api"]), _settings_of(services["worker"])
    postgres_env = services["postgres"]["environment"]
    assert api.database_url == worker.database_url
    assert api.database_url.startswith("postgresql+psycopg://")
    assert f"@postgres:5432/{postgres_env['POSTGRES_DB']}" in api.database_url
    assert api.optuna_storage == worker.optuna_storage != api.database_url
    assert api.data_dir == worker.data_dir
    mounts = {service: services[service]["volumes"] for service in ("api", "worker")}
    assert all(f"bitplan-data:{api.data_dir}" in volumes for volumes in mounts.values())
    assert api.keys_required  # listening on 0.0.0.0: keys are mandatory
    assert worker.heartbeat_seconds < worker.lease_seconds


def test_dockerfile_copies_existing_paths_and_installs_postgres_driver() -> None:
    text = DOCKERFILE.read_text()
    copied = [
        part
        for line in text.splitlines()
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
    ]
    assert {"bitplan", "migrations", "app", "search", "sensitivity"} <= set(copied)
    assert all((ROOT / path).exists() for path in copied)
    assert '".[pg,hf]"' in text and "torch==2.13.0" in text
