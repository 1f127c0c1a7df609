"""Contract section 9, pure: completion, reminders and overdue as given events / when time passes /
then events, for the domain (`decide`) and for the scheduler's due-time index (`next_due`), and a
property: the index says "due" exactly when a firing would append something."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from activities_client.document import EVENT_KINDS, format_datetime, new_activity_id
from activities_client.errors import Gone, NotFound
from events.activity import (
    ActivityBecameOverdue,
    ActivityPatched,
    ActivityReminderDue,
    activity_uuid,
)
from events.commands import FireReminder, MarkOverdue, parse_create, parse_delete, parse_patch, parse_restore
from projections.scheduler import DueRow, DueState, due_now, fold, next_due
from services.domain import Activity, Caller, Decision, decide

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ALICE = Caller(tenant_id="acme", sub="usr-alice")
SYSTEM = Caller(tenant_id="acme", sub="system")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def iso(minutes: float) -> str:
    return format_datetime(at(minutes))


class Story:
    """An activity's life: commands decided on its aggregate at given times, its events kept,
    and the due-time index folded from the same events."""

    def __init__(self, fields: dict[str, Any], when: datetime = T0) -> None:
        self.id = new_activity_id()
        decision = decide(None, parse_create({"account_id": "acc_1", **fields}), ALICE, when, self.id)
        assert decision is not None
        self.activity = Activity.log(activity_uuid(self.id), decision, when)
        self.events: list[Any] = list(self.activity.collect_events())
        self.index = fold({}, self.events)[activity_uuid(self.id)]

    @property
    def document(self) -> dict[str, Any]:
        return self.activity.document

    def _record(self, decision: Decision | None, when: datetime) -> Decision | None:
        if decision is not None:
            self.activity.record(decision, when)
            new = list(self.activity.collect_events())
            self.events += new
            for event in new:
                self.index = next_due(self.index, event)
        return decision

    def patch(self, changes: dict[str, Any], when: datetime) -> Decision | None:
        command = parse_patch({"id": self.id, "changes": changes})
        return self._record(decide(self.document, command, ALICE, when), when)

    def try_patch(self, changes: dict[str, Any], when: datetime) -> None:
        """A patch, unless the activity is deleted (`gone`: nothing appended)."""
        with contextlib.suppress(Gone):
            self.patch(changes, when)

    def delete(self, when: datetime) -> Decision | None:
        return self._record(decide(self.document, parse_delete({"id": self.id}), ALICE, when), when)

    def restore(self, when: datetime) -> Decision | None:
        return self._record(decide(self.document, parse_restore({"id": self.id}), ALICE, when), when)

    def fire_reminder(self, when: datetime) -> Decision | None:
        decision = decide(self.document, FireReminder(self.id), SYSTEM, when, overdue_for=self.activity.overdue_for)
        return self._record(decision, when)

    def mark_overdue(self, when: datetime) -> Decision | None:
        decision = decide(self.document, MarkOverdue(self.id), SYSTEM, when, overdue_for=self.activity.overdue_for)
        return self._record(decision, when)

    def time_passes(self, until: datetime) -> list[str]:
        """What the scheduler appends when time passes to `until`: it fires what the index says is
        due, in due order, each decided at its due time (exactly on time)."""
        fired: list[str] = []
        while due := due_now(self.index.rows(), until):
            row = due[0]
            fire = self.fire_reminder if row.kind == "reminder" else self.mark_overdue
            decision = fire(max(row.due_at, T0))
            assert decision is not None, f"the index said {row.kind} was due but the domain decided nothing"
            fired.append(type(self.events[-1]).__name__)
        return fired


# --- completion ------------------------------------------------------------------------------


def test_a_create_with_a_completing_status_gets_completed_at_now() -> None:
    for status in ("completed", "done", "Done"):
        assert Story({"status": status}).document["completed_at"] == iso(0)
    assert Story({"status": "open"}).document["completed_at"] is None


def test_a_create_that_gives_completed_at_keeps_it() -> None:
    assert Story({"status": "done", "completed_at": "2026-11-30T10:00:00+01:00"}).document["completed_at"] == (
        "2026-11-30T09:00:00Z"
    )


def test_a_patch_to_done_completes_at_the_events_time_and_says_so_in_changes() -> None:
    story = Story({"status": "open"})
    decision = story.patch({"status": "done"}, at(5))
    assert decision is not None and decision.event_class is ActivityPatched
    assert story.document["completed_at"] == iso(5)
    assert decision.changes == {"status": "done", "completed_at": iso(5)}


def test_a_patch_giving_completed_at_or_clearing_it_is_taken_at_its_word() -> None:
    story = Story({"status": "open"})
    story.patch({"status": "completed", "completed_at": iso(-60)}, at(5))
    assert story.document["completed_at"] == iso(-60)
    story.patch({"completed_at": None}, at(6))  # clearing it reopens; the status stays what it was
    assert story.document["completed_at"] is None and story.document["status"] == "completed"
    story.patch({"status": "done", "completed_at": None}, at(7))
    assert story.document["completed_at"] is None


def test_repeating_a_completing_status_never_moves_the_completion_time() -> None:
    story = Story({"status": "done"})
    story.patch({"status": "completed"}, at(5))
    assert story.document["completed_at"] == iso(0)
    assert story.patch({"status": "completed"}, at(6)) is None  # nothing changes: nothing appended


# --- reminders -------------------------------------------------------------------------------


def test_a_reminder_fires_once_when_remind_at_passes() -> None:
    story = Story({"remind_at": iso(10)})
    assert story.time_passes(at(9.99)) == []
    assert story.time_passes(at(10)) == ["ActivityReminderDue"]
    last = story.events[-1]
    assert isinstance(last, ActivityReminderDue) and last.actor == "system" and last.changes == {}
    assert story.document["reminder_sent"] is True and story.document["updated_by"] == "system"
    assert story.document["version"] == 2 and story.document["updated_at"] == iso(10)
    assert story.time_passes(at(60)) == []
    assert story.fire_reminder(at(61)) is None  # a repeated firing decides to nothing


def test_a_firing_before_remind_at_decides_to_nothing() -> None:
    story = Story({"remind_at": iso(10)})
    assert story.fire_reminder(at(9)) is None and story.document["version"] == 1


def test_changing_remind_at_rearms_unless_the_patch_sets_reminder_sent() -> None:
    story = Story({"remind_at": iso(10)})
    story.time_passes(at(10))
    decision = story.patch({"remind_at": iso(20)}, at(11))
    assert decision is not None and decision.changes == {"remind_at": iso(20), "reminder_sent": False}
    assert story.document["reminder_sent"] is False
    assert story.time_passes(at(30)) == ["ActivityReminderDue"]
    story.patch({"remind_at": iso(40), "reminder_sent": True}, at(31))
    assert story.time_passes(at(50)) == []
    story.patch({"subject": "unrelated"}, at(51))  # a patch that leaves remind_at alone does not re-arm
    assert story.document["reminder_sent"] is True


def test_a_reminder_in_the_past_fires_late_once() -> None:
    story = Story({"remind_at": iso(-30)})  # e.g. due while the service was down
    assert story.time_passes(at(0)) == ["ActivityReminderDue"]
    assert story.time_passes(at(1)) == []


def test_no_reminder_for_completed_deleted_or_suppressed_activities() -> None:
    completed = Story({"remind_at": iso(10)})
    completed.patch({"status": "done"}, at(1))
    deleted = Story({"remind_at": iso(10)})
    deleted.delete(at(1))
    suppressed = Story({"remind_at": iso(10), "reminder_sent": True})
    for story in (completed, deleted, suppressed):
        assert story.index.reminder is None
        assert story.fire_reminder(at(11)) is None
        assert story.time_passes(at(60)) == []


def test_a_restored_activity_gets_its_armed_reminder_back() -> None:
    story = Story({"remind_at": iso(10)})
    story.delete(at(1))
    story.restore(at(20))
    assert story.time_passes(at(20)) == ["ActivityReminderDue"]


# --- overdue ---------------------------------------------------------------------------------


def test_overdue_once_per_due_date_value_with_the_document_unchanged() -> None:
    story = Story({"due_date": iso(10), "status": "open"})
    before = story.document
    assert story.time_passes(at(10)) == ["ActivityBecameOverdue"]
    last = story.events[-1]
    assert isinstance(last, ActivityBecameOverdue) and last.actor == "system" and last.changes == {}
    after = story.document
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {"version", "updated_at", "updated_by"} and after["updated_by"] == "system"
    assert story.time_passes(at(100)) == []
    story.patch({"subject": "still overdue"}, at(101))  # other changes keep the memory
    assert story.time_passes(at(200)) == [] and story.mark_overdue(at(201)) is None


def test_moving_due_date_to_the_future_and_past_again_fires_again() -> None:
    story = Story({"due_date": iso(10)})
    assert story.time_passes(at(10)) == ["ActivityBecameOverdue"]
    story.patch({"due_date": iso(30)}, at(11))
    assert story.time_passes(at(29)) == []
    assert story.time_passes(at(30)) == ["ActivityBecameOverdue"]
    story.patch({"due_date": iso(50)}, at(31))
    story.patch({"due_date": iso(30)}, at(32))  # back to a value already fired for: a new passing
    assert story.time_passes(at(33)) == ["ActivityBecameOverdue"]


def test_no_overdue_for_completed_or_deleted_activities_and_none_twice_after_reopening() -> None:
    story = Story({"due_date": iso(10)})
    story.patch({"status": "done"}, at(5))
    assert story.time_passes(at(20)) == [] and story.mark_overdue(at(20)) is None
    story.patch({"completed_at": None}, at(21))  # reopened after the due date: overdue now
    assert story.time_passes(at(21)) == ["ActivityBecameOverdue"]
    story.patch({"status": "done"}, at(22))
    story.patch({"completed_at": None}, at(23))  # reopened again, same due_date: not again
    assert story.time_passes(at(60)) == []
    deleted = Story({"due_date": iso(10)})
    deleted.delete(at(1))
    assert deleted.time_passes(at(20)) == [] and deleted.mark_overdue(at(20)) is None


def test_reminder_and_overdue_are_independent() -> None:
    story = Story({"due_date": iso(10), "remind_at": iso(5)})
    assert story.time_passes(at(20)) == ["ActivityReminderDue", "ActivityBecameOverdue"]


def test_a_firing_for_another_tenant_is_not_found() -> None:
    story = Story({"remind_at": iso(1)})
    try:
        decide(story.document, FireReminder(story.id), Caller("globex", "system"), at(2))
    except NotFound:
        pass
    else:
        raise AssertionError("a firing must not see another tenant's activity")


def test_the_new_event_types_are_published_with_their_kinds() -> None:
    assert EVENT_KINDS["ActivityReminderDue"] == "reminder_due"
    assert EVENT_KINDS["ActivityBecameOverdue"] == "overdue"


# --- the due-time index ----------------------------------------------------------------------


def test_the_index_holds_an_armed_reminder_and_drops_it_when_fired_or_closed() -> None:
    story = Story({"remind_at": iso(10)})
    assert story.index.reminder == DueRow(activity_uuid(story.id), "reminder", at(10), 1, "acme")
    story.patch({"remind_at": iso(15)}, at(1))
    assert story.index.reminder is not None and story.index.reminder.due_at == at(15)
    assert story.index.reminder.version == 2
    story.fire_reminder(at(15))
    assert story.index.reminder is None


def test_the_index_remembers_a_fired_overdue_while_due_date_keeps_its_value() -> None:
    story = Story({"due_date": iso(10)})
    assert story.index.overdue is not None and not story.index.overdue.fired
    story.mark_overdue(at(10))
    assert story.index.overdue is not None and story.index.overdue.fired
    story.patch({"status": "done"}, at(11))  # closed, but it remembers the firing
    assert story.index.overdue is not None and story.index.overdue.fired
    story.patch({"due_date": iso(20)}, at(12))  # closed and moved: nothing to remember, nothing due
    assert story.index.overdue is None
    assert due_now(story.index.rows(), at(100)) == []


def test_due_now_takes_unfired_rows_due_by_now_earliest_first() -> None:
    a, b, c = (activity_uuid(new_activity_id()) for _ in range(3))
    rows = [
        DueRow(a, "reminder", at(5), 1, "t"),
        DueRow(b, "overdue", at(1), 1, "t"),
        DueRow(c, "overdue", at(2), 3, "t", fired=True),
        DueRow(c, "reminder", at(9), 3, "t"),
    ]
    assert [(row.activity_id, row.kind) for row in due_now(rows, at(6))] == [(b, "overdue"), (a, "reminder")]
    assert fold({}, []) == {} and DueState().rows() == []


# --- the property: the index and the domain agree --------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("remind"), st.none() | st.integers(0, 40)),
        st.tuples(st.just("due"), st.none() | st.integers(0, 40)),
        st.tuples(st.just("status"), st.sampled_from(["open", "done"])),
        st.tuples(st.just("reopen"), st.none()),
        st.tuples(st.just("sent"), st.booleans()),
        st.tuples(st.just("delete"), st.none()),
        st.tuples(st.just("restore"), st.none()),
        st.tuples(st.just("wait"), st.integers(1, 15)),
    ),
    max_size=14,
)


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_the_index_says_due_exactly_when_a_firing_appends(steps: list[tuple[str, Any]]) -> None:
    story = Story({"remind_at": iso(5), "due_date": iso(8)})
    now = 0.0
    for action, value in steps:
        now += 0.01
        when = at(now)
        if action == "wait":
            now += value
            story.time_passes(at(now))  # asserts that each row it fires appends
        elif action == "remind":
            story.try_patch({"remind_at": None if value is None else iso(value)}, when)
        elif action == "due":
            story.try_patch({"due_date": None if value is None else iso(value)}, when)
        elif action == "status":
            story.try_patch({"status": value}, when)
        elif action == "reopen":
            story.try_patch({"completed_at": None}, when)
        elif action == "sent":
            story.try_patch({"reminder_sent": value}, when)
        elif action == "delete":
            story.delete(when)
        else:
            story.restore(when)
        # then: nothing the index holds back would fire, and what it holds would
        later = at(now + 1000)
        due_kinds = {row.kind for row in due_now(story.index.rows(), later)}
        for kind, command in (("reminder", FireReminder(story.id)), ("overdue", MarkOverdue(story.id))):
            decision = decide(story.document, command, SYSTEM, later, overdue_for=story.activity.overdue_for)
            assert (decision is not None) == (kind in due_kinds), (kind, steps)


# --- the time filters on the command line -----------------------------------------------------


def test_the_cli_takes_the_time_filters() -> None:
    from services.cli import build_parser

    dates = ["--due-date-from", "2026-01-01T00:00:00Z", "--due-date-to", "2026-02-01"]
    args = build_parser().parse_args(["list", "--overdue", "--no-completed", *dates])
    assert (args.overdue, args.completed) == (True, False)
    assert (args.due_date_from, args.due_date_to) == ("2026-01-01T00:00:00Z", "2026-02-01")
    unset = build_parser().parse_args(["list"])
    assert unset.overdue is None and unset.completed is None  # not sent: neither true nor false
    stats = build_parser().parse_args(["stats", "--group-by", "status", "--no-overdue"])
    assert stats.overdue is False
