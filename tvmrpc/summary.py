"""The tracker summary as text, exactly as stock ``query_rpc_tracker`` prints it.

Pure: takes the SUMMARY reply's dict and returns a string.

Invariants:
- For every summary stock's ``text_summary`` can print, the text is the same,
  byte for byte.
- A server entry stock would crash on (no ``addr``, a key without ``:``; our
  tracker may list an UPDATE_INFO that sent only some fields) is printed
  with ``-`` for the missing address instead of failing the whole query.
"""

from __future__ import annotations

from typing import Any


def format_summary(summary: dict[str, Any]) -> str:
    """Render ``{"queue_info": ..., "server_info": ...}`` as stock's text table."""
    lines = [
        "Server List",
        "-" * 30,
        "server-address           key",
        "-" * 30,
    ]
    servers_per_key: dict[str, int] = {}
    for item in sorted(summary["server_info"], key=lambda info: info["key"]):
        addr = item.get("addr")
        address = ":".join(map(str, addr)) if isinstance(addr, list) else "-"
        lines.append(f"{address:21s}    {item['key']}")
        device_key = item["key"].partition(":")[2].split(":")[0]  # stock: key.split(":")[1]
        servers_per_key[device_key] = servers_per_key.get(device_key, 0) + 1
    lines += ["-" * 30, ""]

    queue_info = summary["queue_info"]
    keys = sorted(queue_info)
    width = max((len(k) for k in keys), default=0)
    title = f"{'key':<{width}s}   total  free  pending"
    rule = "-" * (len(title) + 1)
    lines += ["Queue Status", rule, title, rule]
    for key in keys:
        total = servers_per_key.get(key, 0)
        free, pending = queue_info[key]["free"], queue_info[key]["pending"]
        if total or pending:
            lines.append(f"{key:<{width}}   {total:<5d}  {free:<4d}  {pending:<7d}")
    lines.append(rule)
    return "\n".join(lines) + "\n"


def format_query_output(host: str, port: int, summary: dict[str, Any]) -> str:
    """What stock ``python -m tvm.exec.query_rpc_tracker`` prints, byte for byte."""
    return f"Tracker address {host}:{port}\n\n{format_summary(summary)}\n"
