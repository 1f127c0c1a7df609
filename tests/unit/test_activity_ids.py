"""New activity ids: `act_` and a ULID whose 80 random bits come from the operating system's
generator, read in chunks (activities_client/document.py, _RandomBits)."""

from __future__ import annotations

import os
import pickle
import threading
import time
from unittest.mock import patch
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st
from ulid import ULID

from activities_client import document
from activities_client.document import _random_bits, is_activity_id, new_activity_id
from events.activity import activity_id_of, activity_uuid, new_activity_ref, uuid_of_bits


def test_ids_are_valid_distinct_and_ordered_by_their_millisecond() -> None:
    ids = [new_activity_id() for _ in range(3 * 1024 + 7)]  # past several chunks of random bits
    assert all(is_activity_id(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({i[-16:] for i in ids}) == len(ids)  # the random parts too
    before = new_activity_id()
    time.sleep(0.002)
    assert new_activity_id()[4:14] > before[4:14]  # the timestamp leads
    activity_uuid(ids[0])  # each one is a UUID's 128 bits


def test_a_new_ref_is_an_id_and_its_own_originator_id() -> None:
    refs = [new_activity_ref() for _ in range(2 * 1024 + 3)]
    assert all(is_activity_id(activity_id) for activity_id, _ in refs)
    assert all(activity_uuid(activity_id) == originator_id for activity_id, originator_id in refs)
    assert all(activity_id_of(originator_id) == activity_id for activity_id, originator_id in refs)
    assert len({originator_id for _, originator_id in refs}) == len(refs)


def test_threads_never_get_the_same_bits() -> None:
    found: list[list[int]] = [[] for _ in range(4)]

    def draw(into: list[int]) -> None:
        into.extend(_random_bits.next80() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drawn = [value for into in found for value in into]
    assert len(set(drawn)) == len(drawn) == 20_000


def test_a_forked_child_draws_other_bits_than_its_parent() -> None:
    _random_bits.next80()  # a chunk is in hand when the process forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bits, to the parent
        os.close(read)
        os.write(write, _random_bits.next80().to_bytes(10, "big"))
        os._exit(0)
    os.close(write)
    child = int.from_bytes(os.read(read, 10), "big")
    os.close(read)
    os.waitpid(pid, 0)
    assert child != _random_bits.next80()


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_uuid_of_bits_is_the_uuid_of_that_int(bits: int) -> None:
    made, reference = uuid_of_bits(bits), UUID(int=bits)
    assert made == reference and hash(made) == hash(reference)
    assert (made.bytes, made.hex, str(made), made.is_safe) == (reference.bytes, reference.hex, str(reference),
                                                                reference.is_safe)
    assert pickle.loads(pickle.dumps(made)) == reference


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=2**48 - 1), st.integers(min_value=0, max_value=2**80 - 1))
def test_a_new_ulid_is_written_as_the_ulid_package_writes_its_bits(milliseconds: int, random: int) -> None:
    with patch.object(document.time, "time_ns", return_value=milliseconds * 1_000_000 + 999_999), \
            patch.object(document._random_bits, "next80", return_value=random):
        text, bits = document._new_ulid()
    assert bits == milliseconds << 80 | random
    assert text == str(ULID.from_int(bits)) == document._ulid_text(bits)
