"""NATS subject names, all derived from one configurable prefix (docs/contract.md sections 3-5)."""

from __future__ import annotations

from dataclasses import dataclass

COMMAND_QUEUE = "activities"
"""The queue group every instance serves commands and queries in."""

COMMAND_NAMES = ("create", "patch", "delete", "restore")
QUERY_NAMES = ("get", "list")
INBOX_OPS = ("create", "patch", "delete", "restore", "upsert", "batch", "erase")
"""The ops a publisher may send to the durable inbox (docs/contract.md section 10)."""


@dataclass(frozen=True)
class Subjects:
    """Every subject the service uses, from the prefix (default `crm.activities`)."""

    prefix: str = "crm.activities"

    def command(self, name: str) -> str:
        return f"{self.prefix}.cmd.{name}"

    def query(self, name: str) -> str:
        return f"{self.prefix}.query.{name}"

    def event(self, tenant_id: str, kind: str) -> str:
        return f"{self.prefix}.events.{tenant_id}.{kind}"

    def tenant_events(self, tenant_id: str) -> str:
        return f"{self.prefix}.events.{tenant_id}.>"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.>"

    # The durable inbox (docs/contract.md section 10) --------------------------------------------

    def inbox(self, op: str) -> str:
        return f"{self.prefix}.inbox.{op}"

    @property
    def all_inbox(self) -> str:
        return f"{self.prefix}.inbox.>"

    def results(self, tenant_id: str) -> str:
        return f"{self.prefix}.results.{tenant_id}"

    @property
    def all_results(self) -> str:
        return f"{self.prefix}.results.>"

    def dlq(self, op: str) -> str:
        return f"{self.prefix}.dlq.{op}"

    @property
    def all_dlq(self) -> str:
        return f"{self.prefix}.dlq.>"
