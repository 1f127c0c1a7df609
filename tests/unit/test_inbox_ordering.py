"""Which earlier inbox commands a command waits for (services/inbox.py `ordering_of`, `Sequencer`)."""

from __future__ import annotations

import asyncio

import orjson
from nats.aio.msg import Msg

from services.inbox import Ordering, Sequencer, ordering_of, stream_sequence


def body(value: object) -> bytes:
    return orjson.dumps(value)


def test_what_a_command_names() -> None:
    assert ordering_of("create", body({"account_id": "a"})) == Ordering()
    assert ordering_of("patch", body({"id": "act_1", "changes": {}})) == Ordering(frozenset({"id:act_1"}), "id")
    assert ordering_of("delete", body({"id": "act_1"})).keys == frozenset({"id:act_1"})
    assert ordering_of("erase", body({"id": "act_1"})).keys == frozenset({"id:act_1"})
    assert ordering_of("upsert", body({"external_key": "crm-7", "activity": {}})) == Ordering(
        frozenset({"key:crm-7"}), "key"
    )
    assert ordering_of("batch", body({"commands": []})).barrier
    assert ordering_of("erase", body({"contact_id": "c-1"})).barrier
    assert ordering_of("frobnicate", body({"id": "act_1"})).barrier
    # a body that names nothing is a validation error whatever ran before: it waits for nothing
    assert ordering_of("patch", b"not json") == Ordering()
    assert ordering_of("patch", body([1])) == Ordering()
    assert ordering_of("patch", body({"changes": {}})) == Ordering()


async def test_commands_on_one_activity_wait_for_each_other_only() -> None:
    sequencer = Sequencer()
    waits_a1, done_a1 = sequencer.admit(ordering_of("patch", body({"id": "A"})))
    waits_b1, _ = sequencer.admit(ordering_of("patch", body({"id": "B"})))
    waits_a2, done_a2 = sequencer.admit(ordering_of("delete", body({"id": "A"})))
    waits_c, _ = sequencer.admit(ordering_of("create", body({})))
    assert waits_a1 == [] and waits_b1 == [] and waits_c == []
    assert waits_a2 == [done_a1]
    done_a1.set_result(None)
    await asyncio.sleep(0)
    waits_a3, _ = sequencer.admit(ordering_of("restore", body({"id": "A"})))
    assert waits_a3 == [done_a2]  # the latest earlier command on A, not A1 again
    assert sequencer.in_hand == 4


async def test_upserts_and_id_commands_wait_for_each_other_and_barriers_for_all() -> None:
    sequencer = Sequencer()
    _, patch = sequencer.admit(ordering_of("patch", body({"id": "A"})))
    waits_upsert, upsert = sequencer.admit(ordering_of("upsert", body({"external_key": "k"})))
    assert waits_upsert == [patch]
    waits_patch, patch_b = sequencer.admit(ordering_of("patch", body({"id": "B"})))
    assert waits_patch == [upsert]
    waits_batch, batch = sequencer.admit(ordering_of("batch", body({"commands": []})))
    assert set(waits_batch) == {patch, upsert, patch_b}
    waits_create, _ = sequencer.admit(ordering_of("create", body({})))
    assert waits_create == [batch]
    for done in (patch, upsert, patch_b, batch):
        done.set_result(None)
    await asyncio.sleep(0)
    assert sequencer.admit(ordering_of("patch", body({"id": "A"})))[0] == []


def test_the_stream_sequence_of_a_command_is_read_from_its_ack_subject() -> None:
    plain = Msg(None, reply="$JS.ACK.CRM_ACTIVITIES_COMMANDS.activities-inbox.1.42.7.1733560000000000000.3")  # type: ignore[arg-type]
    assert stream_sequence(plain) == 42 == plain.metadata.sequence.stream
    # with a domain and an account hash: nats-py's reading
    domain = Msg(
        None,  # type: ignore[arg-type]
        reply="$JS.ACK.hub.ACCHASH.CRM_ACTIVITIES_COMMANDS.activities-inbox.1.77.7.1733560000000000000.3.tok",
    )
    assert stream_sequence(domain) == 77 == domain.metadata.sequence.stream
