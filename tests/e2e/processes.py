"""`activities serve` as a real process, as users and operators run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.config import Settings

ACTIVITIES = str(Path(sys.executable).parent / "activities")


def settings_env(settings: Settings) -> dict[str, str]:
    """The process environment that gives a service these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIVITIES_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"ACTIVITIES_{name.upper()}"] = str(value)
    env["ACTIVITIES_LOG_LEVEL"] = "WARNING"
    return env


class ServiceProcess:
    """`activities serve [--role ...]`, restartable; its data dir is its own."""

    def __init__(self, settings: Settings, roles: str = "commands,projector,relay,http", name: str = "service") -> None:
        self.settings = settings.model_copy(update={"data_dir": settings.data_dir / name})
        self.roles = roles
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        endpoints = data_dir / "endpoints.json"
        endpoints.unlink(missing_ok=True)
        log = (data_dir / "service.log").open("ab")
        self.process = subprocess.Popen(
            [ACTIVITIES, "serve", "--role", self.roles], env=settings_env(self.settings), stdout=log, stderr=log
        )
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            assert self.process.poll() is None, f"the service exited; see {data_dir / 'service.log'}"
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
