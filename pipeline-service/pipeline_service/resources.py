"""The resources the pipeline knows, as data: one entry drives both the ingest and the API.

Adding a resource means adding an entry here, a model, a schema and a migration.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from pydantic import BaseModel
from sqlalchemy import Column, DateTime, Table

from pipeline_service.models import Customer, Machine, MachineReading
from pipeline_service.schemas import (
    CustomerRecord,
    MachineRecord,
    PageValidator,
    ReadingRecord,
)


@dataclass(frozen=True)
class Parent:
    """A resource whose rows must exist before a child row can reference them."""

    resource: str
    column: str


@dataclass(frozen=True, eq=False)
class Resource:
    name: str
    """URL segment on both services and the value of ``?resource=``."""
    source_path: str
    """Path of the paginated collection on the source API."""
    table: Table
    record: type[BaseModel]
    """Validates a source record and shapes the re-served one."""
    key: tuple[str, ...]
    parent: Parent | None = None
    positioned: bool = False
    """Served as a top-level collection whose pages are range seeks on ``position``."""

    @property
    def fields(self) -> tuple[str, ...]:
        """The record's fields, which are also its column names, in schema order."""
        return tuple(self.record.model_fields)

    @property
    def columns(self) -> list[Column]:
        return [self.table.c[name] for name in self.fields]

    @property
    def key_columns(self) -> list[Column]:
        return [self.table.c[name] for name in self.key]

    def key_of(self, record: BaseModel) -> tuple:
        return tuple(getattr(record, name) for name in self.key)

    def canonical_key(self, raw: dict) -> tuple:
        """The key of a raw record as PostgreSQL would compare it (timestamps as UTC
        instants); raises when the record has no readable key."""
        values = []
        for name, is_timestamp in self._key_kinds:
            value = raw[name]
            if not isinstance(value, str):
                raise TypeError(f"{name} is not a string")
            if is_timestamp:
                value = datetime.fromisoformat(value).astimezone(UTC)
            values.append(value)
        return tuple(values)

    def canonical_keys(self, valid: Sequence[dict]) -> list[tuple]:
        """:meth:`canonical_key` of each of ``valid`` records (whose keys are known to be
        readable), at a fraction of the cost where the key is one text column."""
        if len(self.key) == 1 and not self._key_kinds[0][1]:
            (name,) = self.key
            return [(raw[name],) for raw in valid]
        return [self.canonical_key(raw) for raw in valid]

    @cached_property
    def _key_kinds(self) -> tuple[tuple[str, bool], ...]:
        return tuple((n, isinstance(self.table.c[n].type, DateTime)) for n in self.key)

    @cached_property
    def page_validator(self) -> PageValidator:
        return PageValidator(self.record)


CUSTOMERS = Resource(
    name="customers",
    source_path="/api/customers",
    table=Customer.__table__,
    record=CustomerRecord,
    key=("customer_id",),
    positioned=True,
)
MACHINES = Resource(
    name="machines",
    source_path="/api/machines",
    table=Machine.__table__,
    record=MachineRecord,
    key=("machine_id",),
    positioned=True,
)
READINGS = Resource(
    name="readings",
    source_path="/api/readings",
    table=MachineReading.__table__,
    record=ReadingRecord,
    key=("machine_id", "timestamp"),
    parent=Parent(resource="machines", column="machine_id"),
)

RESOURCES: dict[str, Resource] = {r.name: r for r in (CUSTOMERS, MACHINES, READINGS)}
"""Every resource, in the order an ingest takes them (parents before children)."""
