"""Aligned plain-text tables: the one printer behind the tables owl2 prints and logs (evaluation scores,
optimizer parameter groups, ``owl2 model summary``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ALIGNMENTS = ("<", ">")


@dataclass(frozen=True)
class Column:
    """One column: the row key it shows, its header (default: the key), the format spec of its values
    (``format(value, spec)``, e.g. ``".4f"``), the side it is flush to (``"<"`` text, ``">"`` numbers) and its
    least width (so that tables of one kind line up with each other)."""

    key: str
    header: str | None = None
    spec: str = ""
    align: str = ">"
    width: int = 0

    def __post_init__(self) -> None:
        if self.align not in ALIGNMENTS:
            raise ValueError(f"column {self.key!r}: align must be one of {list(ALIGNMENTS)}, not {self.align!r}")

    @property
    def title(self) -> str:
        return self.key if self.header is None else self.header

    def cell(self, row: Mapping[str, Any]) -> str:
        """The row's value as text; a missing or ``None`` value is a blank cell."""
        value = row.get(self.key)
        return "" if value is None else format(value, self.spec)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    title: str = "",
    header: bool = True,
    rules: bool = False,
    footer: Sequence[Mapping[str, Any]] = (),
    indent: str = "",
) -> str:
    """``rows`` (mappings from column keys to values) as aligned text, columns two spaces apart.

    ``title`` is a line above the table; ``header`` prints the column headers; ``rules`` draws a line of dashes
    under the header and above the ``footer`` rows (totals, say); ``indent`` starts every line but the title.
    Lines carry no trailing blanks.
    """
    heads = [column.title for column in columns] if header else []
    body = [[column.cell(row) for column in columns] for row in rows]
    tail = [[column.cell(row) for column in columns] for row in footer]
    widths = [
        max([column.width, *(len(line[index]) for line in ([heads] if header else []) + body + tail)])
        for index, column in enumerate(columns)
    ]

    def render(cells: Sequence[str]) -> str:
        padded = (f"{cell:{column.align}{width}}" for cell, column, width in zip(cells, columns, widths, strict=True))
        return (indent + "  ".join(padded)).rstrip()

    rule = [indent + "-" * (sum(widths) + 2 * (len(widths) - 1))] if rules else []
    lines = [title] if title else []
    if header:
        lines += [render(heads), *rule]
    lines += map(render, body)
    if tail:
        lines += [*rule, *map(render, tail)]
    return "\n".join(lines)
