"""Source records: the three JSON files, loaded once and kept as pre-serialized bytes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class StartupError(Exception):
    """A problem that stops the mock server from starting; its message is one line."""


@dataclass(frozen=True)
class Resource:
    """One served collection: its URL name, its file, the field that addresses one record
    by id (if any) and the field that groups records under a machine (if any)."""

    name: str
    filename: str
    key: str | None = None
    group_by: str | None = None


RESOURCES: tuple[Resource, ...] = (
    Resource("customers", "customers.json", key="customer_id"),
    Resource("machines", "machines.json", key="machine_id"),
    Resource("readings", "readings.json", group_by="machine_id"),
)


@dataclass(frozen=True)
class Collection:
    """Every element of one file, in file order, each as the JSON text it was written with."""

    items: list[bytes]
    by_key: dict[str, bytes] = field(default_factory=dict)
    groups: dict[str, list[bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    """All source records, by resource name."""

    collections: dict[str, Collection]

    def counts(self) -> dict[str, int]:
        """Number of elements served per resource (invalid ones included)."""
        return {name: len(c.items) for name, c in self.collections.items()}


_WS = re.compile(r"[ \t\n\r]*")
_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


class NumberText(str):
    """A JSON number kept as the text it was written with (never a plain str)."""

    __slots__ = ()


# Numbers stay text: only string keys are looked at, and huge numbers must not fail.
_DECODER = json.JSONDecoder(
    parse_float=NumberText, parse_int=NumberText, parse_constant=_reject_constant
)


def split_array(text: str) -> Iterator[tuple[str, object]]:
    """Yield (raw text, decoded value) for each element of the JSON array in `text`.

    The raw text is the element exactly as written (numbers such as 1e400 or 30-digit
    integers keep their spelling); in the decoded value numbers are NumberText.
    Raises ValueError (json.JSONDecodeError for syntax errors) when `text` is not one
    JSON array; NaN and Infinity are rejected.
    """
    pos = _WS.match(text).end()
    if text[pos : pos + 1] != "[":
        raise json.JSONDecodeError("expected a JSON array", text, pos)
    pos = _WS.match(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        pos = _WS.match(text, pos + 1).end()
    else:
        scan_once, separator_after = _DECODER.scan_once, _SEPARATOR.match
        while True:
            try:
                value, end = scan_once(text, pos)
            except StopIteration as e:
                raise json.JSONDecodeError("expected a value", text, e.value) from None
            yield text[pos:end], value
            separator = separator_after(text, end)
            if separator is None:
                raise json.JSONDecodeError("expected ',' or ']'", text, _WS.match(text, end).end())
            pos = separator.end()
            if separator[1] == "]":
                break
    if pos != len(text):
        raise json.JSONDecodeError("extra data after the array", text, pos)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StartupError(f"data file {path} does not exist") from None
    except OSError as e:
        raise StartupError(f"cannot read data file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StartupError(f"data file {path} is not UTF-8 (byte {e.start})") from None


def load_collection(path: Path, key: str | None = None, group_by: str | None = None) -> Collection:
    """Load one file, keeping every element in file order.

    by_key maps each string `key` value to the last record carrying it; groups maps each
    string `group_by` value to its records in file order. Elements that are not objects,
    or whose field is missing or not a string, are served in pages but are neither
    addressable nor grouped. Raises StartupError naming the file when it is missing,
    unreadable or not a JSON array.
    """
    text = _read_text(path)
    items: list[bytes] = []
    by_key: dict[str, bytes] = {}
    groups: dict[str, list[bytes]] = {}
    try:
        for raw, value in split_array(text):
            encoded = raw.encode("utf-8")
            items.append(encoded)
            if not isinstance(value, dict):
                continue
            if key is not None and type(record_key := value.get(key)) is str:
                by_key[record_key] = encoded
            if group_by is not None and type(group := value.get(group_by)) is str:
                groups.setdefault(group, []).append(encoded)
    except json.JSONDecodeError as e:
        problem = f"{e.msg} (line {e.lineno}, column {e.colno})"
        raise StartupError(f"data file {path} is not a valid JSON array: {problem}") from None
    except (ValueError, RecursionError) as e:
        raise StartupError(f"data file {path} is not a valid JSON array: {e}") from None
    return Collection(items=items, by_key=by_key, groups=groups)


def load_dataset(data_dir: Path) -> Dataset:
    """Load customers.json, machines.json and readings.json from `data_dir`, once.

    Raises StartupError with a one-line message naming the first file that is missing
    or unparsable.
    """
    return Dataset(
        collections={
            r.name: load_collection(data_dir / r.filename, r.key, r.group_by) for r in RESOURCES
        }
    )
