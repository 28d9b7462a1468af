"""What the tracker keeps of an UPDATE_INFO (pure)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvmrpc.tracker.info import (
    EXTENSION_FIELD,
    MAX_EXTENSION_BYTES,
    MAX_EXTENSION_DEPTH,
    MAX_INFO_KEY_CHARS,
    InfoError,
    clean_info,
    nesting_depth,
)


def test_stock_server_and_proxy_infos_pass_unchanged():
    for info in (
        {"key": "server:rk3399", "addr": [None, 9090]},
        {"key": "server:rk3399", "addr": ["192.0.2.7", 9090]},
        {"key": "server:proxy[rk3399,rasp4]", "addr": [None, 9091]},
    ):
        assert clean_info(info) == info


def test_unknown_fields_are_dropped_and_extension_kept():
    report = {"sessions": {"ok": 1, "failed": [{"why": "timeout"}]}}
    info = {"key": "server:rk", "other": {"x": 1}, EXTENSION_FIELD: report}
    assert clean_info(info) == {"key": "server:rk", EXTENSION_FIELD: report}


def test_extension_at_its_limits():
    deepest = {"a": {"b": {"c": {}}}}
    assert nesting_depth(deepest, MAX_EXTENSION_DEPTH) == MAX_EXTENSION_DEPTH
    assert clean_info({EXTENSION_FIELD: deepest}) == {EXTENSION_FIELD: deepest}
    with pytest.raises(InfoError, match="nested more than 4 deep"):
        clean_info({EXTENSION_FIELD: {"a": {"b": {"c": {"d": []}}}}})
    fits = {"s": "x" * (MAX_EXTENSION_BYTES - len('{"s": ""}'))}
    assert len(json.dumps(fits)) == MAX_EXTENSION_BYTES
    assert clean_info({EXTENSION_FIELD: fits})[EXTENSION_FIELD] is fits
    with pytest.raises(InfoError, match=f"4097 bytes as JSON \\(at most {MAX_EXTENSION_BYTES}\\)"):
        clean_info({EXTENSION_FIELD: {"s": fits["s"] + "x"}})


def test_long_proxy_keys_fit_but_not_without_bound():
    # our proxy advertises at most 340 keys (--max-server-keys) of up to 256 characters
    keys = ",".join(f"{i:03d}" + "b" * 253 for i in range(340))
    assert clean_info({"key": f"server:proxy[{keys}]"})
    with pytest.raises(InfoError, match=f"at most {MAX_INFO_KEY_CHARS}"):
        clean_info({"key": "server:" + "k" * MAX_INFO_KEY_CHARS})


@pytest.mark.parametrize(
    "addr", ["h:1", ["h"], ["h", 1, 2], ["h", "1"], ["h", True], [None, -1], ["a b", 1], [7, 1]]
)
def test_bad_addrs(addr):
    with pytest.raises(InfoError, match="UPDATE_INFO addr"):
        clean_info({"addr": addr})


def test_depth_of_a_very_deep_value_is_cut_short():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert nesting_depth(deep, 4) == 5
    with pytest.raises(InfoError):
        clean_info({EXTENSION_FIELD: {"x": deep}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=30,
)


@given(st.dictionaries(st.sampled_from(["key", "addr", EXTENSION_FIELD, "x"]), json_values))
def test_any_info_is_cleaned_or_refused(info):
    try:
        clean = clean_info(info)
    except InfoError:
        return
    assert set(clean) <= {"key", "addr", EXTENSION_FIELD}
    if EXTENSION_FIELD in clean:
        assert nesting_depth(clean[EXTENSION_FIELD], 99) <= MAX_EXTENSION_DEPTH
        assert len(json.dumps(clean[EXTENSION_FIELD]).encode()) <= MAX_EXTENSION_BYTES
