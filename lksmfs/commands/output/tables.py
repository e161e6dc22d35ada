"""Plain text tables, the one way lksmfs prints rows of figures (simulate, the demo, benches)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def cell(value: object) -> str:
    """A value as a table cell: '-' for None, yes/NO, ints with thousands separators,
    floats with the digits that matter at their size."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """The lines of a table: a header, a rule, a line per row; each column as wide as its
    widest cell.  `align` has one '<' or '>' per column (missing ones: '>')."""
    cells = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligns = [align[i] if i < len(align) else ">" for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "<" else c.rjust(w)
                         for c, w, a in zip(row, widths, aligns, strict=True)).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])]


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> None:
    """format_table on stdout."""
    for text in format_table(headers, rows, align):
        print(text)
