"""The service as users run it: `activities serve` on embedded defaults, a plain nats-py client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import orjson
import pytest

ACTIVITIES = str(Path(sys.executable).parent / "activities")


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIVITIES_")}
    env.update({"ACTIVITIES_DATA_DIR": str(data_dir), "ACTIVITIES_HTTP_PORT": "0", "ACTIVITIES_EMBEDDED_NATS_PORT": "0"})
    return env


def wait_for_endpoints(data_dir: Path, process: subprocess.Popen[bytes], timeout_s: float = 60) -> dict[str, str]:
    path = data_dir / "endpoints.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if process.poll() is not None:
            raise AssertionError(f"activities serve exited with {process.returncode}")
        time.sleep(0.1)
    raise AssertionError("activities serve did not write endpoints.json in time")


def start_service(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    (data_dir / "endpoints.json").unlink(missing_ok=True)
    log = (data_dir.parent / f"{data_dir.name}.log").open("ab")
    process = subprocess.Popen([ACTIVITIES, "serve"], env=_env(data_dir), stdout=log, stderr=log)
    return process, wait_for_endpoints(data_dir, process)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "data"
    directory.mkdir()
    yield directory
    # embedded servers are stopped by the service on SIGTERM; make sure nothing is left running
    for pid_file in directory.rglob("nats-server.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    subprocess.run(
        [sys.executable, "-c", "import sys; from services.embedded import EmbeddedPostgres; from pathlib import Path; "
         "p = EmbeddedPostgres(Path(sys.argv[1])); p.start(); p.stop()", str(directory / "postgres")],
        check=False, capture_output=True,
    )


async def create_over_nats(nats_url: str, token: str, body: dict[str, object], key: str | None = None) -> dict[str, object]:
    client = await nats.connect(nats_url)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        if key:
            headers["Idempotency-Key"] = key
        reply = await client.request("crm.activities.cmd.create", orjson.dumps(body), headers=headers, timeout=10)
        return dict(orjson.loads(reply.data))
    finally:
        await client.close()


async def test_serve_on_embedded_defaults_answers_a_plain_nats_request_and_keeps_data(data_dir: Path) -> None:
    process, endpoints = start_service(data_dir)
    try:
        assert endpoints["database_url"].startswith("postgresql://") and endpoints["nats_url"].startswith("nats://")
        token = subprocess.run(
            [ACTIVITIES, "token", "--tenant", "acme", "--sub", "usr-1"], env=_env(data_dir),
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        reply = await create_over_nats(endpoints["nats_url"], token, {"account_id": "acc_1", "type": "call"}, "k-1")
        assert reply["data"]["tenant_id"] == "acme"  # type: ignore[index]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0

    # a restart keeps the data: the same key replays the same activity
    process, endpoints = start_service(data_dir)
    try:
        again = await create_over_nats(endpoints["nats_url"], token, {"account_id": "acc_1", "type": "call"}, "k-1")
        assert again == reply
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
