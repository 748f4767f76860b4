"""The whole-page fast path accepts a page only when record-by-record validation would."""

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_service.ingest import PageWriter, validate_page
from pipeline_service.resources import RESOURCES
from pipeline_service.source import parse_json

from conftest import customer, machine, reading

text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet="ab😀\x00\ud800\\\"'", max_size=60),
    st.sampled_from(["", "x" * 100, "x" * 101, "x" * 255, "x" * 256, "😀" * 50, "😀" * 51]),
)
digits = st.text(alphabet="0123456789", min_size=1, max_size=3)
timestamp = st.one_of(
    st.builds(
        "{}-{}-{}{}{}:{}:{}{}{}".format,
        st.sampled_from(["2024", "0000", "0001", "9999", "24"]),
        st.sampled_from(["01", "02", "12", "13", "00"]),
        st.sampled_from(["01", "28", "29", "30", "31", "32"]),
        st.sampled_from(["T", "t", " "]),
        st.sampled_from(["00", "23", "24", "99"]),
        st.sampled_from(["00", "59", "60"]),
        st.sampled_from(["00", "59", "60", "61"]),
        st.sampled_from(["", ".5", ".123456", ".1234567"]),
        st.sampled_from(["Z", "z", "", "+00:00", "-07:30", "+14:00", "+15:59", "+16:00", "+1:00"]),
    ),
    text,
)
date_text = st.one_of(
    st.builds(
        "{}-{}-{}".format,
        st.sampled_from(["1990", "0000", "0001", "9999", "99999"]),
        st.sampled_from(["01", "02", "13", "1"]),
        st.sampled_from(["01", "29", "30", "31", "32"]),
    ),
    text,
)
number = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.decimals(places=3, allow_nan=False, allow_infinity=False).map(float),
    st.sampled_from([0, -0.0, 0.01, 1.005, 12.5, 9999999999999.99, 10**13, -(10**13), 1e300]),
)
anything = st.one_of(st.none(), st.booleans(), number, text, st.lists(st.integers(), max_size=2))
FIELD_VALUES = {
    "customer_id": text,
    "machine_id": st.one_of(st.sampled_from(["MCH001", "MCH002"]), text),
    "timestamp": timestamp,
    "created_at": timestamp,
    "date_of_birth": date_text,
    "account_balance": number,
    "temperature": number,
    "speed": number,
    "status": st.sampled_from(["IDLE", "STARTED", "COMPLETED", "ERROR", "idle", ""]),
}
VALID = {"customers": customer, "machines": machine, "readings": lambda n: reading(1, n % 60)}


@st.composite
def records(draw, resource_name: str) -> dict:
    """A valid record with a few fields replaced, removed or added."""
    record = VALID[resource_name](draw(st.integers(1, 999)))
    for name in draw(st.lists(st.sampled_from(sorted(record)), max_size=3, unique=True)):
        choice = draw(st.sampled_from(["value", "anything", "null", "drop"]))
        if choice == "drop":
            del record[name]
        elif choice == "null":
            record[name] = None
        else:
            record[name] = draw(FIELD_VALUES.get(name, text) if choice == "value" else anything)
    if draw(st.booleans()):
        record["unknown_field"] = draw(anything)
    return record


def body_of(page: list) -> bytes:
    # json, not orjson: it writes integers of any size, lone surrogates and NUL as \u escapes
    return json.dumps({"data": page, "total": len(page), "page": 1, "limit": 100}).encode()


@pytest.mark.parametrize("resource_name", sorted(RESOURCES))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_fast_path_accepts_a_page_only_if_every_record_is_valid(resource_name, data):
    resource = RESOURCES[resource_name]
    page = data.draw(st.lists(records(resource_name), min_size=1, max_size=4))
    body = body_of(page)
    values = resource.page_validator.valid_values(body)
    if values is not None:
        parsed = parse_json(body)["data"]
        assert validate_page(resource, parsed).rejected == []
        # The very values the parser reads, so that both render the same CSV rows and
        # digests (repr tells 5 from 5.0).
        writer = PageWriter(resource)
        assert repr(values) == repr([writer.values(record) for record in parsed])


@pytest.mark.parametrize("resource_name", sorted(RESOURCES))
def test_the_fast_path_takes_ordinary_valid_pages(resource_name):
    page = [VALID[resource_name](n) for n in range(1, 200)]
    validator = RESOURCES[resource_name].page_validator
    assert validator.all_valid(orjson.dumps({"data": page}))
    assert validator.all_valid(json.dumps({"data": page}, indent=2).encode())  # spaced out


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": [{"customer_id": 5, "customer_id": "C1", "first_name": "A", '
        b'"last_name": "B", "email": "a@b.c", "created_at": "2024-01-01T00:00:00Z"}]}',
        b'{"data": [{"customer_id": "C1", "first_name": "A", "last_name": "B", '
        b'"email": "a@b.c", "created_at": "2024-01-01T00:00:00Z", "account_balance": 1e2}]}',
        b'{"data": [{"customer_id": "C1", "first_name": "A", "last_name": "B", '
        b'"email": "a@b.c", "created_at": "2024-01-01T00:00:00Z", "account_balance": 1.001}]}',
        b'{"data": [{"customer_id": "C\\u0000", "first_name": "A", "last_name": "B", '
        b'"email": "a@b.c", "created_at": "2024-01-01T00:00:00Z"}]}',
        b'{"data": [{"customer_id": "C1", "first_name": "A", "last_name": "B", '
        b'"email": "a@b.c", "created_at": "2024-01-01T00:00:00"}]}',
        *(
            # Timestamps msgspec reads but the model refuses, after a valid one.
            b'{"data": [{"customer_id": "C1", "first_name": "A", "last_name": "B", '
            b'"email": "a@b.c", "created_at": "2024-01-01T00:00:00Z"}, {"customer_id": "C2", '
            b'"first_name": "A", "last_name": "B", "email": "a@b.c", "created_at": "%s"}]}' % form
            for form in [
                b"2024-01-01t00:00:00z",
                b"2024-01-01 00:00:00Z",
                b"2024-01-01T00:00:00.1234567Z",
                b"2024-01-01T00:00:00+16:00",
            ]
        ),
        b'{"data": [{"customer_id": "C1"}',
    ],
    ids=[
        "repeated-key",
        "exponent",
        "three-places",
        "nul-escape",
        "no-offset",
        "lowercase",
        "space",
        "seven-digits",
        "offset-16h",
        "cut-short",
    ],
)
def test_the_fast_path_leaves_doubtful_pages_to_the_record_by_record_check(body):
    assert not RESOURCES["customers"].page_validator.all_valid(body)


def test_an_integer_the_parser_reads_as_a_float_is_left_to_the_record_by_record_check():
    body = (
        b'{"data": [{"machine_id": "M001", "timestamp": "2024-06-01T08:01:00Z", '
        b'"temperature": 70.1, "speed": -9223372036854775809, "status": "STARTED"}]}'
    )
    assert isinstance(parse_json(body)["data"][0]["speed"], float)
    assert not RESOURCES["readings"].page_validator.all_valid(body)
