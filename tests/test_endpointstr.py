"""The endpoint-string splitter shared by the mtls: and systemd: parsers."""

from tvmrpc.endpointstr import split_colons
from tvmrpc.systemd.activation import _split


def test_fields_split_on_unescaped_colons_only():
    assert split_colons(r"mtls:9191:privateKey=C\:\\keys\\k.pem:") == [
        "mtls",
        "9191",
        r"privateKey=C:\keys\k.pem",
        "",
    ]
    assert split_colons("trailing\\") == ["trailing"]


def test_activation_drops_empty_fields():
    assert _split(r"name=web\:1::fd=3") == ["name=web:1", "fd=3"]
