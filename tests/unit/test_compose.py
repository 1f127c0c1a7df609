"""docker-compose.yml is for users (no Docker engine here): check it by parsing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from services.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_every_variable_the_service_gets_is_a_setting() -> None:
    environment = compose()["services"]["activities"]["environment"]
    known = {f"ACTIVITIES_{name.upper()}" for name in Settings.model_fields}
    assert environment, "the service must be configured by environment"
    assert set(environment) <= known, set(environment) - known


def test_ports_and_hosts_agree() -> None:
    services = compose()["services"]
    environment = services["activities"]["environment"]
    database = urlparse(environment["ACTIVITIES_DATABASE_URL"])
    nats_url = urlparse(environment["ACTIVITIES_NATS_URL"])
    assert database.hostname == "postgres" and database.port == 5432
    assert nats_url.hostname == "nats" and nats_url.port == 4222
    assert "5432:5432" in services["postgres"]["ports"] and "4222:4222" in services["nats"]["ports"]
    assert f"{environment['ACTIVITIES_HTTP_PORT']}:8080" in services["activities"]["ports"]
    postgres_env = services["postgres"]["environment"]
    assert (database.username, database.password) == (postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"])
    assert database.path.lstrip("/") == postgres_env["POSTGRES_DB"]


def test_jetstream_volumes_and_healthchecks() -> None:
    services = compose()["services"]
    assert "-js" in services["nats"]["command"]
    assert services["nats"]["volumes"] and services["postgres"]["volumes"]
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["nats"]
    depends = services["activities"]["depends_on"]
    assert depends["postgres"]["condition"] == depends["nats"]["condition"] == "service_healthy"
    assert services["activities"]["build"] == "."
    assert (ROOT / "Dockerfile").exists()
