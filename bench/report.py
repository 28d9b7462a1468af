"""Side-by-side benchmark tables: stock, ours, and how many times better ours is."""

from __future__ import annotations

import attrs


@attrs.define
class Row:
    label: str
    stock: float
    ours: float
    better: str  # "lower" or "higher"

    @property
    def ratio(self) -> float:
        """How many times better ours is (>1 means ours wins)."""
        if self.better == "lower":
            return self.stock / self.ours if self.ours else float("inf")
        return self.ours / self.stock if self.stock else float("inf")

    def line(self) -> str:
        return f"{self.label:<48} {self.stock:>12.3f} {self.ours:>12.3f} {self.ratio:>9.1f}x"


@attrs.define
class Table:
    title: str
    rows: list[Row] = attrs.Factory(list)

    def add(self, label: str, stock: float, ours: float, better: str) -> Row:
        row = Row(label, stock, ours, better)
        self.rows.append(row)
        return row

    def header(self) -> str:
        """Title and column heads: print it, then each row's ``line()`` as it comes."""
        head = f"{'':<48} {'stock':>12} {'ours':>12} {'ours/stock':>10}"
        return f"== {self.title} ==\n{head}"

    def render(self) -> str:
        """The whole table at once (for benchmarks that print it at the end)."""
        return "\n".join([self.header(), *(row.line() for row in self.rows)])
