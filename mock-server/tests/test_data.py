"""Loading the JSON files: raw element text, keys, groups, and start-up errors."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest
from mock_server.data import NumberText, StartupError, load_collection, load_dataset, split_array

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data"


def test_split_array_keeps_each_element_exactly_as_written() -> None:
    text = (
        ' \n[ 1e400 ,123456789012345678901234567890,\t"\\u0000 😀",'
        '{ "a" : [1, 2.50] } , null,\r\n[] ]\n'
    )
    raws = [raw for raw, _ in split_array(text)]
    assert raws == [
        "1e400",
        "123456789012345678901234567890",
        '"\\u0000 😀"',
        '{ "a" : [1, 2.50] }',
        "null",
        "[]",
    ]


def test_split_array_leaves_numbers_as_text_in_decoded_values() -> None:
    values = [value for _, value in split_array('[{"n": 1e400, "k": "K"}, 7]')]
    assert values == [{"n": "1e400", "k": "K"}, "7"]
    assert type(values[0]["n"]) is NumberText
    assert type(values[0]["k"]) is str


def test_split_array_accepts_an_empty_array() -> None:
    assert list(split_array(" [ ] \n")) == []


@pytest.mark.parametrize(
    "text",
    ["", "{}", '"x"', "[1,]", "[1 2]", "[1] x", "[1", "[", "[NaN]", "[-Infinity]", "[1], [2]"],
)
def test_split_array_rejects_anything_but_one_json_array(text: str) -> None:
    with pytest.raises(ValueError):
        list(split_array(text))


def test_later_record_wins_for_a_duplicated_key(tmp_path: Path) -> None:
    path = tmp_path / "customers.json"
    path.write_text(
        '[{"customer_id": "A", "v": 1}, {"customer_id": "B"}, {"customer_id": "A", "v": 2}]'
    )
    collection = load_collection(path, key="customer_id")
    assert len(collection.items) == 3
    assert collection.by_key["A"] == b'{"customer_id": "A", "v": 2}'
    assert set(collection.by_key) == {"A", "B"}


def test_elements_without_a_string_key_are_kept_but_not_addressable(tmp_path: Path) -> None:
    path = tmp_path / "readings.json"
    path.write_text(
        '[42, "x", null, [1], {"machine_id": 7}, {"machine_id": 1.5}, {}, {"machine_id": "M1"}]'
    )
    collection = load_collection(path, key="machine_id", group_by="machine_id")
    assert len(collection.items) == 8
    assert list(collection.by_key) == ["M1"]
    assert collection.groups == {"M1": [b'{"machine_id": "M1"}']}


def test_groups_keep_file_order(tmp_path: Path) -> None:
    path = tmp_path / "readings.json"
    rows = [{"machine_id": m, "i": i} for i, m in enumerate("ABAAB")]
    path.write_text(json.dumps(rows))
    groups = load_collection(path, group_by="machine_id").groups
    assert [json.loads(r)["i"] for r in groups["A"]] == [0, 2, 3]
    assert [json.loads(r)["i"] for r in groups["B"]] == [1, 4]


def test_a_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "machines.json"
    path.write_bytes(b'\xef\xbb\xbf[{"machine_id": "M1"}]')
    assert load_collection(path, key="machine_id").items == [b'{"machine_id": "M1"}']


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"customers\.json does not exist"),
        (
            b'[{"customer_id": "A"},\n  {oops}]',
            r"customers\.json is not a valid JSON array: .*line 2",
        ),
        (
            b'{"customer_id": "A"}',
            r"customers\.json is not a valid JSON array: expected a JSON array",
        ),
        (b"[NaN]", r"customers\.json is not a valid JSON array: NaN"),
        (b'["\xff"]', r"customers\.json is not UTF-8"),
        (b"[" * 100_000, r"customers\.json is not a valid JSON array"),
    ],
)
def test_unusable_file_stops_loading_with_a_message_naming_it(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    for name in ("machines.json", "readings.json"):
        (tmp_path / name).write_text("[]")
    if content is not None:
        (tmp_path / "customers.json").write_bytes(content)
    with pytest.raises(StartupError, match=expected) as info:
        load_dataset(tmp_path)
    assert "\n" not in str(info.value)


def test_sample_data_follows_the_contract() -> None:
    dataset = load_dataset(SAMPLE_DIR)
    customers = [json.loads(r) for r in dataset.collections["customers"].items]
    machines = [json.loads(r) for r in dataset.collections["machines"].items]
    readings = [json.loads(r) for r in dataset.collections["readings"].items]
    statuses = {"IDLE", "STARTED", "COMPLETED", "ERROR"}

    assert [c["customer_id"] for c in customers] == [f"CUST{i:03d}" for i in range(1, 22)]
    for c in customers:
        assert set(c) == {
            "customer_id",
            "first_name",
            "last_name",
            "email",
            "phone",
            "address",
            "date_of_birth",
            "account_balance",
            "created_at",
        }
        assert c["date_of_birth"] is None or re.fullmatch(r"\d{4}-\d{2}-\d{2}", c["date_of_birth"])
        balance = c["account_balance"]
        assert balance is None or round(balance, 2) == balance
        datetime.fromisoformat(c["created_at"])
    assert any(c["account_balance"] is not None and c["account_balance"] < 0 for c in customers)
    assert any(c["phone"] is None for c in customers)

    assert [m["machine_id"] for m in machines] == [f"MCH{i:03d}" for i in range(1, 7)]
    assert all(m["status"] in statuses for m in machines)

    temperatures: dict[str, list[float]] = defaultdict(list)
    for r in readings:
        assert r["status"] in statuses
        datetime.fromisoformat(r["timestamp"])
        temperatures[r["machine_id"]].append(r["temperature"])
    assert set(temperatures) == {m["machine_id"] for m in machines}
    assert temperatures["MCH001"] == [100, 110, 130, 80, 105, 110]
    for machine_id, values in temperatures.items():
        if machine_id != "MCH001":
            assert 12 <= len(values) <= 20
        average = sum(values) / len(values)
        assert any(abs(v - average) > 0.2 * average for v in values), machine_id
