"""`txsms.core.jsoncodec.loads` reads what `json.loads` reads, as `json.loads` reads it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import orjson
import pytest

from txsms.core import jsoncodec

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*/*.json"))


def test_every_fixture_reads_as_the_standard_library_reads_it():
    assert len(FIXTURES) >= 20
    for path in FIXTURES:
        raw = path.read_bytes()
        assert jsoncodec.loads(raw) == json.loads(raw), path.name
        assert jsoncodec.loads(raw.decode()) == json.loads(raw), path.name


@pytest.mark.parametrize(
    "text",
    [
        b'{"id": 9223372036854775807, "min": -9223372036854775808, "u64": 18446744073709551615}',
        b'{"a": 1, "a": 2}',  # the last one wins, in both
        b'{"price": "19.99", "rate": 0.1, "e": 1E2, "neg": -0}',
        b'{"name": "Jos\\u00e9 \\ud83d\\ude00", "raw": "Jos\xc3\xa9"}',
    ],
)
def test_same_values_and_types(text):
    ours, theirs = jsoncodec.loads(text), json.loads(text)
    assert ours == theirs
    assert [type(v) for v in ours.values()] == [type(v) for v in theirs.values()]


@pytest.mark.parametrize(
    "text",
    [
        b'{"total": NaN, "cap": Infinity}',  # not JSON, but read before
        b'\xef\xbb\xbf{"id": 1}',  # a UTF-8 byte-order mark
        '{"id": 1}'.encode("utf-16"),
        b'{"s": "\\ud800"}',  # a lone surrogate
        b'{"big": 1e400}',
    ],
)
def test_what_orjson_refuses_is_read_by_the_standard_library(text):
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)  # the case is real: this is the path that handles it
    ours, theirs = jsoncodec.loads(text), json.loads(text)
    assert repr(ours) == repr(theirs)  # repr: NaN is not equal to itself
    if "total" in ours:
        assert math.isnan(ours["total"])


@pytest.mark.parametrize("text", [b"", b"{", b'{"a": 1,}', b"[1, 2", b"\xff\xfe\x00", b"nul"])
def test_malformed_input_raises_value_error(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsoncodec.loads(text)
