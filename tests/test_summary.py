"""`tvmrpc query`'s table is stock's ``text_summary`` byte for byte."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tvm.rpc.client import TrackerSession

from tvmrpc.summary import format_query_output, format_summary

keys = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=18)
summaries = st.fixed_dictionaries(
    {
        "queue_info": st.dictionaries(
            keys,
            st.fixed_dictionaries({"free": st.integers(0, 99), "pending": st.integers(0, 999)}),
            max_size=6,
        ),
        "server_info": st.lists(
            st.fixed_dictionaries(
                {
                    "key": keys.map(lambda k: f"server:{k}"),
                    "addr": st.tuples(
                        st.sampled_from(["127.0.0.1", "192.0.2.10", "10.0.0.1"]),
                        st.integers(1, 65535),
                    ).map(list),
                }
            ),
            max_size=6,
        ),
    }
)


class _FakeTrackerSession:
    def __init__(self, summary):
        self._summary = summary

    def summary(self):
        return self._summary


@settings(max_examples=200, deadline=None)
@given(summaries)
def test_matches_stock_text_summary(summary):
    stock = TrackerSession.text_summary(_FakeTrackerSession(summary))
    assert format_summary(summary) == stock


def test_query_output_frame():
    summary = {"queue_info": {}, "server_info": []}
    text = format_query_output("h", 1, summary)
    assert text.startswith("Tracker address h:1\n\n")
    assert text.endswith(format_summary(summary) + "\n")


def test_partial_server_entries_do_not_break_the_table():
    """Stock's text_summary raises KeyError/IndexError on these; ours prints them."""
    summary = {
        "queue_info": {"rk": {"free": 1, "pending": 0}},
        "server_info": [
            {"key": "server:rk", "addr": ["10.0.0.1", 9090], "tvmrpc": {"sessions": 3}},
            {"key": "server:rk"},
            {"key": "server", "addr": ["10.0.0.2", 1]},
        ],
    }
    text = format_summary(summary)
    assert "10.0.0.1:9090            server:rk\n" in text
    assert "-                        server:rk\n" in text
    assert "10.0.0.2:1               server\n" in text
    assert "rk   2      1     0      \n" in text
