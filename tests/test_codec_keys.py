"""The shared key grammar: plain calls on pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvmrpc.codec import MAX_KEY_CHARS, MAX_MATCHKEY_CHARS, BadKeyError, check_key, key_problem


@pytest.mark.parametrize("key", ["rk3399", "proxy[k1,k2]", "a" * MAX_KEY_CHARS, "jetson:1234"])
def test_real_keys_are_valid(key: str) -> None:
    assert key_problem(key) is None
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("a" * (MAX_KEY_CHARS + 1), f"{MAX_KEY_CHARS + 1} characters long"),
        ("rk 3399", "whitespace"),
        ("rk\x003399", "control"),
        (7, "must be a string"),
    ],
)
def test_bad_keys_say_why(key: object, reason: str) -> None:
    problem = key_problem(key, "PUT key")
    assert problem is not None
    assert reason in problem
    assert problem.startswith("PUT key")
    with pytest.raises(BadKeyError, match=reason):
        check_key(key, "PUT key")


@given(st.text(max_size=300))
def test_any_string_is_judged_without_crashing(key: str) -> None:
    problem = key_problem(key)
    printable = key.isprintable() and not any(c.isspace() for c in key)
    valid = 0 < len(key) <= MAX_KEY_CHARS and printable
    assert (problem is None) == valid


def test_printable_whitespace_is_only_the_ascii_space() -> None:
    """What lets key_problem check whitespace with ``" " in key`` after isprintable()."""
    import sys

    odd = [
        ch
        for ch in map(chr, range(sys.maxunicode + 1))
        if ch.isprintable() and ch.isspace() and ch != " "
    ]
    assert odd == []


def test_callers_may_allow_longer_keys() -> None:
    long_key = "server:proxy[" + ",".join(["board"] * 100) + "]"
    assert "at most 256" in key_problem(long_key)
    assert key_problem(long_key, max_chars=4096) is None
    assert check_key(long_key, "UPDATE_INFO key", 4096) == long_key
    assert key_problem(MAX_MATCHKEY_CHARS * "m") is not None
    assert key_problem(MAX_MATCHKEY_CHARS * "m", max_chars=MAX_MATCHKEY_CHARS) is None
