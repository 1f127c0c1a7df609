"""The naive baseline: a FastStream subscriber doing one eventsourcing save per command.

Same aggregate, same rules and event format as the service, but the eventsourcing library's own
PostgreSQL recorder (a locked transaction per save), no group commit and FastStream's default
request pipeline. Run by bench/run.py as its own process:
    python -m bench.naive NATS_URL DATABASE_URL SUBJECT
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import orjson
import uvloop
from faststream import FastStream
from faststream.nats import NatsBroker, NatsMessage

from activities_client.document import new_activity_id
from activities_client.errors import ActivitiesError
from events.activity import activity_uuid
from events.commands import parse_create
from services.application import ActivitiesApplication, application_env
from services.domain import Activity, Caller, decide

CALLER = Caller(tenant_id="bench", sub="usr-bench")


def main() -> None:
    nats_url, database_url, subject = sys.argv[1:4]
    env = application_env(database_url, pool_size=8)
    del env["APPLICATION_RECORDER_TOPIC"]  # the library's stock recorder, not the service's
    app = ActivitiesApplication(env=env)
    broker = NatsBroker(nats_url)

    @broker.subscriber(subject, queue="naive", max_workers=64)
    async def create(message: NatsMessage) -> bytes:
        def save() -> bytes:
            try:
                now = datetime.now(UTC)
                activity_id = new_activity_id()
                decision = decide(None, parse_create(message.body), CALLER, now, activity_id)
                assert decision is not None
                activity = Activity.log(activity_uuid(activity_id), decision, now)
                recordings = app.save(activity)
                return orjson.dumps({"data": activity.document, "meta": {"position": recordings[-1].notification.id}})
            except ActivitiesError as error:
                return orjson.dumps(error.to_envelope())

        return await asyncio.get_running_loop().run_in_executor(None, save)

    uvloop.run(FastStream(broker).run())


if __name__ == "__main__":
    main()
