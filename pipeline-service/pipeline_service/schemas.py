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
from operator import attrgetter
from types import UnionType
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

import msgspec
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
from pydantic.fields import FieldInfo
from pydantic.types import AllowInfNan

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


# --- the fast path: a whole page validated in one pass, by msgspec ------------------------


class PageValidator:
    """Validates a whole source page body ``{"data": [...], ...}`` in one pass.

    It answers "every record is valid" only when per-record validation with the record
    model would accept every record too, and is cheap enough to run on every page (a
    tenth of the model's cost). It decodes the body into a msgspec type translated from
    the record model, field by field, where each translation accepts no more than the
    model does. Values stay as JSON gives them (strings, numbers, null), so that a valid
    page's records need no second parse; dates, timestamps and measurements are then
    checked column by column as msgspec reads those types, timestamps also in the exact
    form the model allows. What the translation cannot express is checked on the body
    itself: numbers within their digits, and no ``\\u`` escape at all (the only way NUL and
    lone surrogates can arrive). It never rejects a record itself; a "no" only means "look
    closer", record by record.
    """

    def __init__(self, record: type[BaseModel]) -> None:
        fields, misfits, checks = [], [], []
        for place, (name, info) in enumerate(record.model_fields.items()):
            native, checked, value_format = _fast_type(name, info.annotation, info.metadata)
            default = msgspec.NODEFAULT if info.is_required() else info.default
            fields.append((name, native, default))
            column_form = None
            if value_format is _TIMESTAMP:
                # Decoded, timestamps stay strings: their column joined by NULs is checked
                # at once. No string of a page that gets this far holds a NUL: JSON has no
                # raw control characters, and pages with \u escapes are refused first.
                column_form = re.compile(rf"(?:(?:{_TIMESTAMP.pattern})\x00)*{_TIMESTAMP.pattern}")
            elif value_format is not None:
                # "name": and a value not of the form; such a key cannot occur inside a JSON
                # string, where a quote is always escaped. The spaces before the value are
                # taken possessively: given back, a space would itself be "not of the form".
                key = b'"' + re.escape(name.encode()) + rb'"\s*:\s*+'
                form = value_format.pattern.encode()
                misfits.append(key + rb"(?!(?:" + form + rb"|null)[\s,}\]])")
            if checked is not None:
                checks.append((place, list[checked], column_form))
        # A scan of the body per field finds any value not of its form: each pattern starts
        # with its field's name, which the regex engine finds faster than it tries one
        # alternation of all fields at every quote.
        self._misfits = [re.compile(misfit) for misfit in misfits]
        self._checks = checks
        strict = msgspec.defstruct(f"Fast{record.__name__}", fields, kw_only=True)
        self._decoder = msgspec.json.Decoder(msgspec.defstruct("Page", [("data", list[strict])]))
        self._values = attrgetter(*record.model_fields)

    def valid_values(self, body: bytes) -> list[tuple] | None:
        """If every record of the page is valid: each record's field values in the model's
        field order, the very values a JSON parser reads (a field left out is None).
        Otherwise None."""
        if b"\\" in body and b"\\u" in body:  # a one-byte search first: many times faster
            return None
        if any(misfit.search(body) for misfit in self._misfits):
            return None
        try:
            records = self._decoder.decode(body).data
        except msgspec.DecodeError:  # an invalid record, or a body that is not JSON
            return None
        values = list(map(self._values, records))
        for place, column_type, column_form in self._checks:
            column = [row[place] for row in values]
            if column_form is not None:
                present = "\x00".join([value for value in column if value is not None])
                if present and not column_form.fullmatch(present):
                    return None
            try:
                msgspec.convert(column, column_type)
            except msgspec.ValidationError:
                return None
        return values

    def all_valid(self, body: bytes) -> bool:
        return self.valid_values(body) is not None


_Integer = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""An integer that the parser reads as one too: orjson reads those beyond 64 bits as floats."""

_KNOWN_CHECKS = {_require_string, _storable_text, _require_iso_date, _require_timestamp}


def _fast_type(name: str, annotation: Any, metadata: list[Any]) -> tuple[Any, Any, Any]:
    """For a record field: the msgspec type its values decode to (as JSON gives them), the
    msgspec type the column of those values must also convert to (or None), and the pattern
    every value must match as written (or None). Raises TypeError for a field it cannot
    translate faithfully."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        native, checked, value_format = _fast_type(name, inner, metadata)
        return native | None, None if checked is None else checked | None, value_format
    if origin is Annotated:
        return _fast_type(name, args[0], [*annotation.__metadata__, *metadata])
    if origin is Literal:
        return annotation, None, None
    lengths, digits = {}, None
    for item in metadata:
        if isinstance(item, StringConstraints):
            lengths = {"min_length": item.min_length or 0}
            if item.max_length is not None:
                lengths["max_length"] = item.max_length
        elif isinstance(item, FieldInfo):
            (general,) = item.metadata
            digits = (general.max_digits, general.decimal_places)
        elif isinstance(item, BeforeValidator | AfterValidator) and item.func in _KNOWN_CHECKS:
            pass  # JSON strings only, no NUL, dates and timestamps: msgspec's own rules
        elif isinstance(item, BeforeValidator) and item.func is _require_number:
            pass  # a JSON number, finite: msgspec's float, which refuses 1e400 too
        elif isinstance(item, PlainSerializer) or item == AllowInfNan(False):
            pass
        else:
            raise TypeError(f"field {name}: no fast-path check for {item!r}")
    if annotation is str:
        return Annotated[str, msgspec.Meta(**lengths)], None, None
    if annotation is date:
        return str, date, None
    if annotation is AwareDatetime:
        return str, Annotated[datetime, msgspec.Meta(tz=True)], _TIMESTAMP
    # _Integer | float keeps 5 an int, as JSON parsers do (the column still converts to float)
    if annotation is float:
        return _Integer | float, float, None
    if annotation is Decimal and digits is not None:
        max_digits, places = digits
        whole = max_digits - places
        number = rf"-?(?:0|[1-9]\d{{0,{whole - 1}}})(?:\.\d{{1,{places}}})?"
        return _Integer | float, None, re.compile(number)  # within its digits: always a float
    raise TypeError(f"field {name}: no fast-path type for {annotation!r}")
