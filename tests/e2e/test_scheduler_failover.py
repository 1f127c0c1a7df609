"""Failover of the scheduler: two `activities serve --role scheduler` processes; the active one is
killed with SIGKILL while reminders are coming due. Every reminder fires exactly once: the standby
takes the advisory lock, resumes the due-time index from its recorded position and fires what the
dead one had not (late), and nothing it had fired fires again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from activities_client import AsyncClient
from activities_client.document import format_datetime
from projections.scheduler import DUE_TRACKING_TABLE
from services.bootstrap import Runtime
from services.config import Settings
from tests.conftest import WITHOUT_SCHEDULER
from tests.e2e.processes import ServiceProcess

pytestmark = pytest.mark.slow

REMINDERS = 60


def index_started(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        present = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (DUE_TRACKING_TABLE,)).fetchone()
        return bool(present and present[0])


async def test_sigkill_of_the_active_scheduler_fires_every_reminder_once(
    make_settings: Callable[..., Settings], token: Callable[..., str], tmp_path: Path
) -> None:
    settings = make_settings(data_dir=tmp_path / "failover")
    assert settings.database_url is not None
    service = Runtime(settings.model_copy(update={"data_dir": tmp_path / "service"}), WITHOUT_SCHEDULER)
    await service.start()
    active = ServiceProcess(settings, roles="scheduler", name="scheduler-a")
    standby = ServiceProcess(settings, roles="scheduler", name="scheduler-b")
    try:
        active.start()
        deadline = time.monotonic() + 30
        while not index_started(settings.database_url):  # `a` holds the lock: it made the index
            assert time.monotonic() < deadline, "the first scheduler never became active"
            await asyncio.sleep(0.1)
        standby.start()
        assert service.http is not None
        async with AsyncClient(
            nats_url=settings.nats_url,
            token=token(),
            http_url=service.http.url,
            subject_prefix=settings.subject_prefix,
            stream_name=settings.stream_name,
        ) as client:
            activities = client.customer.activities
            start = datetime.now(UTC) + timedelta(seconds=2)
            created = [
                await activities.create(
                    account_id="acc_1", remind_at=format_datetime(start + timedelta(seconds=i * 4 / REMINDERS))
                )
                for i in range(REMINDERS)
            ]
            await asyncio.sleep(max((start - datetime.now(UTC)).total_seconds(), 0) + 2.0)  # about half are due
            active.kill()
            killed_at = datetime.now(UTC)
            deadline = time.monotonic() + 30
            while True:
                documents = [await activities.get(a.id) for a in created]
                if all(document.reminder_sent for document in documents):
                    break
                assert time.monotonic() < deadline, "the standby did not fire the rest"
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)  # time for a second firing, if there were one
            fired_at = []
            for activity in created:
                events = await activities.history(activity.id)
                assert [event.event_type for event in events] == ["ActivityLogged", "ActivityReminderDue"]
                fired_at.append(events[1].occurred_at)
            # the kill fell in the middle: the first instance fired some, the standby the rest
            assert any(at < killed_at for at in fired_at) and any(at > killed_at for at in fired_at)
    finally:
        active.stop()
        standby.stop()
        await service.stop()
