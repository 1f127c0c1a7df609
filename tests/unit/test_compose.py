"""docker-compose.yml is for users (no Docker engine here): check it by parsing it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from psycopg.conninfo import conninfo_to_dict

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


CLUSTER_NATS = ("nats-1", "nats-2", "nats-3")
CLUSTER_POSTGRES = ("postgres-primary", "postgres-standby")
CLUSTER_SERVICE = ("activities-commands-1", "activities-commands-2", "activities-log-1", "activities-log-2")


def cluster_services() -> dict[str, Any]:
    services = compose()["services"]
    return {name: spec for name, spec in services.items() if "cluster" in spec.get("profiles", [])}


def test_the_cluster_profile_has_three_nats_nodes_a_primary_a_standby_and_four_service_processes() -> None:
    services = compose()["services"]
    assert set(cluster_services()) == {*CLUSTER_NATS, *CLUSTER_POSTGRES, *CLUSTER_SERVICE}
    for name in ("nats", "postgres", "activities"):  # the single-node stack stays the default
        assert "profiles" not in services[name]
    roles = {name: services[name]["command"] for name in CLUSTER_SERVICE}
    assert [roles[name][-1] for name in CLUSTER_SERVICE] == ["commands,http"] * 2 + ["projector,relay"] * 2
    assert all(command[:2] == ["serve", "--role"] for command in roles.values())
    ports = {services[name]["ports"][0] for name in CLUSTER_SERVICE[:2]}
    assert ports == {"8081:8080", "8082:8080"}


def test_nats_nodes_route_to_each_other_with_jetstream() -> None:
    services = cluster_services()
    for name in CLUSTER_NATS:
        command = services[name]["command"]
        option = dict(zip(command[1::2], command[2::2], strict=False))  # after "-js"
        assert command[0] == "-js" and option["--server_name"] == name
        assert option["--cluster_name"] == "activities" and option["--cluster"] == "nats://0.0.0.0:6222"
        routes = {urlparse(route).hostname for route in option["--routes"].split(",")}
        assert routes == set(CLUSTER_NATS) - {name}
        assert "healthcheck" in services[name] and services[name]["volumes"]
    assert len({services[name]["volumes"][0] for name in CLUSTER_NATS}) == 3  # a store each


def test_the_standby_streams_from_the_primary_and_is_never_a_waiting_primary() -> None:
    services = cluster_services()
    primary, standby = services["postgres-primary"], services["postgres-standby"]
    primary_script, standby_script = primary["entrypoint"][-1], standby["entrypoint"][-1]
    assert "host replication" in primary_script and "synchronous_standby_names = 'standby'" in primary_script
    assert "wal_level=replica" in primary_script
    assert "pg_basebackup -h postgres-primary" in standby_script and " -R " in standby_script
    assert "application_name=standby" in standby_script  # the name the primary waits for
    assert re.search(r"-c synchronous_standby_names=\s*$", standby_script, re.MULTILINE)
    assert standby["depends_on"]["postgres-primary"]["condition"] == "service_healthy"
    assert "healthcheck" in primary and "healthcheck" in standby


def test_cluster_processes_get_every_node_and_both_servers() -> None:
    services = cluster_services()
    known = {f"ACTIVITIES_{name.upper()}" for name in Settings.model_fields}
    for name in CLUSTER_SERVICE:
        spec = services[name]
        environment = spec["environment"]
        assert set(environment) <= known, set(environment) - known
        nats_hosts = [urlparse(url).hostname for url in environment["ACTIVITIES_NATS_URL"].split(",")]
        assert nats_hosts == list(CLUSTER_NATS)
        assert environment["ACTIVITIES_STREAM_REPLICAS"] == "3"
        write_url, read_url = environment["ACTIVITIES_DATABASE_URL"], environment["ACTIVITIES_READ_DATABASE_URL"]
        write, read = conninfo_to_dict(write_url), conninfo_to_dict(read_url)  # as libpq reads them
        assert (write["host"], write["port"]) == ("postgres-primary,postgres-standby", "5432,5432")
        assert write["target_session_attrs"] == "read-write"
        assert (read["host"], read["target_session_attrs"]) == ("postgres-standby,postgres-primary", "prefer-standby")
        assert set(spec["depends_on"]) == {*CLUSTER_NATS, *CLUSTER_POSTGRES}
        assert all(dep["condition"] == "service_healthy" for dep in spec["depends_on"].values())
        assert spec["build"] == "."
