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
from types import UnionType
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    create_model,
)

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _require_string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_json_type(value)}")
    return value


def _storable_text(value: str) -> str:
    # PostgreSQL text holds neither U+0000 nor lone surrogates; either would fail its page.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    if _LONE_SURROGATE.search(value):
        raise ValueError("must not contain a lone UTF-16 surrogate")
    return value


def _require_iso_date(value: Any) -> Any:
    if isinstance(value, date):
        return value
    _require_string(value)
    if not _ISO_DATE.fullmatch(value):
        raise ValueError(f"must be a date as YYYY-MM-DD, got {value!r}")
    return value


# The ISO-8601 timestamps PostgreSQL reads exactly as pydantic does: seconds present, at
# most microseconds, an offset (Z or +HH:MM) that PostgreSQL accepts (within 15:59).
_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-](?:0\d|1[0-5]):[0-5]\d)"
)


def _require_timestamp(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    _require_string(value)
    if not _TIMESTAMP.fullmatch(value):
        raise ValueError(
            "must be an ISO-8601 timestamp like 2024-03-05T10:11:12Z or "
            f"2024-03-05T10:11:12.5+01:00, got {value!r}"
        )
    return value


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
        AfterValidator(_storable_text),
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
Measurement = Annotated[float, BeforeValidator(_require_number), Field(allow_inf_nan=False)]
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
    page: int | None = Field(description="The page asked for; null when walking with 'after'")
    limit: int
    next: str | None = Field(
        default=None,
        description="URL of the following records (an 'after' cursor); null when this "
        "page came back with fewer than 'limit' records",
    )


class ErrorBody(BaseModel):
    """Every error answer of the API has this shape."""

    error: str


# --- the fast path: a whole page validated in one call to pydantic-core ------------------

_PYTHON_CHECKS = (BeforeValidator, AfterValidator, PlainSerializer)


def _without_python_checks(annotation: Any) -> Any:
    """``annotation`` with its Python validators and serializers removed, constraints kept."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        kept = [m for m in annotation.__metadata__ if not isinstance(m, _PYTHON_CHECKS)]
        inner = _without_python_checks(args[0])
        return Annotated[(inner, *kept)] if kept else inner
    if origin in (Union, UnionType):
        return Union[tuple(_without_python_checks(a) for a in args)]  # noqa: UP007
    return annotation


class PageValidator:
    """Validates a whole source page body ``{"data": [...], ...}`` in one pass, in Rust.

    It answers "every record is valid" only when per-record validation with the record
    model would accept every record too: the strict JSON-mode model it uses enforces JSON
    types, and what only the Python checks catch (a number sent as a string, NUL characters
    and lone surrogates, which arrive as ``\\u`` escapes) sends the page to the per-record
    path instead. It never rejects a record itself; a ``False`` only means "look closer".
    """

    def __init__(self, record: type[BaseModel]) -> None:
        fields = {}
        number_fields, timestamp_fields = [], []
        for name, info in record.model_fields.items():
            annotation = (
                Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            )
            if any(
                isinstance(m, BeforeValidator) and m.func is _require_number
                for m in _all_metadata(annotation)
            ):
                number_fields.append(name)
            if any(
                isinstance(m, BeforeValidator) and m.func is _require_timestamp
                for m in _all_metadata(annotation)
            ):
                timestamp_fields.append(name)
            default = ... if info.is_required() else info.default
            fields[name] = (_without_python_checks(annotation), default)
        strict = create_model(
            f"Strict{record.__name__}",
            __config__=ConfigDict(strict=True, extra="ignore", allow_inf_nan=False),
            **fields,
        )
        envelope = create_model(f"Strict{record.__name__}Page", data=(list[strict], ...))
        self._adapter = TypeAdapter(envelope)
        # A number field written as a JSON string needs the closer look (one pattern per
        # field: a literal prefix keeps the scan fast).
        self._number_as_string = [
            re.compile(b'"' + re.escape(name.encode()) + rb'"\s*:\s*"') for name in number_fields
        ]

        # Every timestamp must be of the form the per-record check allows.
        self._timestamps = [
            re.compile(b'"' + re.escape(name.encode()) + rb'"\s*:\s*"([^"]*)"')
            for name in timestamp_fields
        ]
        self._timestamp = re.compile(_TIMESTAMP.pattern.encode())

    def all_valid(self, body: bytes) -> bool:
        if b"\\u" in body or any(p.search(body) for p in self._number_as_string):
            return False
        for pattern in self._timestamps:
            if not all(self._timestamp.fullmatch(v) for v in pattern.findall(body)):
                return False
        try:
            self._adapter.validate_json(body)
        except ValidationError:
            return False
        return True


def _all_metadata(annotation: Any) -> list[Any]:
    found = []
    if get_origin(annotation) is Annotated:
        found.extend(annotation.__metadata__)
    for arg in get_args(annotation):
        found.extend(_all_metadata(arg))
    return found
