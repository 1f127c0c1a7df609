"""The embedded nats-server's Go runtime uses half the machine's cores, unless told otherwise
(services/embedded.py, `nats_environment`)."""

from __future__ import annotations

import pytest

from services.embedded import nats_environment


@pytest.mark.parametrize(("cores", "expected"), [(None, "1"), (1, "1"), (2, "1"), (3, "1"), (4, "2"), (16, "8")])
def test_half_the_cores_at_least_one(cores: int | None, expected: str) -> None:
    assert nats_environment({"PATH": "/bin"}, cores) == {"PATH": "/bin", "GOMAXPROCS": expected}


def test_a_gomaxprocs_of_the_environment_is_kept() -> None:
    environ = {"GOMAXPROCS": "4", "HOME": "/root"}
    assert nats_environment(environ, 2) == environ
    assert environ == {"GOMAXPROCS": "4", "HOME": "/root"}  # the given environment is not changed
