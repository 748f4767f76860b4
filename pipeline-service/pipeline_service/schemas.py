"""Record schemas: one model per resource validates source records and shapes API answers.

Validation is strict where the source could silently lose information: strings must be
JSON strings, numbers JSON numbers, dates ``YYYY-MM-DD``, timestamps ISO-8601 with an
offset. Already-typed Python values (as read back from PostgreSQL) are accepted as they are,
so the same model serializes stored rows.
"""

import math
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
)

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _require_string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_json_type(value)}")
    return value


def _reject_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000; storing it would fail the whole page.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


def _require_iso_date(value: Any) -> Any:
    if isinstance(value, date):
        return value
    _require_string(value)
    if not _ISO_DATE.fullmatch(value):
        raise ValueError(f"must be a date as YYYY-MM-DD, got {value!r}")
    return value


def _require_timestamp(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    return _require_string(value)


def _require_number(value: Any) -> Any:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {_json_type(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _json_type(value: Any) -> str:
    names = {bool: "boolean", str: "string", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else "unknown")


def _utc_iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def text(min_length: int = 0, max_length: int | None = None) -> Any:
    """A JSON string without NUL characters, within the length its column allows."""
    return Annotated[
        str,
        StringConstraints(min_length=min_length, max_length=max_length),
        BeforeValidator(_require_string),
        AfterValidator(_reject_nul),
    ]


Key = text(1, 50)
IsoDate = Annotated[date, BeforeValidator(_require_iso_date)]
Timestamp = Annotated[
    AwareDatetime,
    BeforeValidator(_require_timestamp),
    PlainSerializer(_utc_iso, when_used="json"),
]
Money = Annotated[
    Decimal,
    BeforeValidator(_require_number),
    Field(max_digits=15, decimal_places=2),
    PlainSerializer(float, when_used="json"),
]
Measurement = Annotated[float, BeforeValidator(_require_number)]
MachineStatus = Literal["IDLE", "STARTED", "COMPLETED", "ERROR"]


class RecordModel(BaseModel):
    """Base of the record schemas: unknown source fields are ignored, not stored."""

    model_config = ConfigDict(extra="ignore", from_attributes=True)


class CustomerRecord(RecordModel):
    customer_id: Key
    first_name: text(1, 100)
    last_name: text(1, 100)
    email: text(3, 255)
    phone: text(max_length=20) | None = None
    address: text() | None = None
    date_of_birth: IsoDate | None = None
    account_balance: Money | None = None
    created_at: Timestamp


class MachineRecord(RecordModel):
    machine_id: Key
    name: text(1, 100)
    model: text(1, 100)
    location: text(1, 255)
    status: MachineStatus
    created_at: Timestamp


class ReadingRecord(RecordModel):
    machine_id: Key
    timestamp: Timestamp
    temperature: Measurement
    speed: Measurement
    status: MachineStatus


def describe_errors(error: ValidationError) -> str:
    """One human-readable line naming each offending field and what was wrong with it."""
    parts = []
    for item in error.errors(include_url=False):
        field = ".".join(str(p) for p in item["loc"]) or "record"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is required"
        parts.append(f"{field}: {message}")
    return "; ".join(parts)


RecordT = TypeVar("RecordT", bound=BaseModel)


class Page(BaseModel, Generic[RecordT]):
    """One page of a collection, in key order."""

    data: list[RecordT]
    total: int = Field(description="Number of records in the whole collection")
    page: int
    limit: int


class ErrorBody(BaseModel):
    """Every error answer of the API has this shape."""

    error: str
