"""A report as blocks (headings, text, tables, code) and three ways to print them.

``text`` and ``markdown`` need nothing but the standard library; ``rich`` draws the same
blocks as terminal tables (the ``cli`` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Union


@dataclasses.dataclass(frozen=True)
class Heading:
    """A section title."""

    text: str


@dataclasses.dataclass(frozen=True)
class Text:
    """A paragraph (may span lines)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows of cells under column names; ``numeric`` columns are right-aligned, ``no_wrap``
    ones are kept on one line on a terminal (cut with an ellipsis if they must be)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    numeric: frozenset[int] = frozenset()
    title: str | None = None
    no_wrap: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Code:
    """Something to run or paste: SQL, an ini file, settings."""

    text: str
    language: str = "sql"


Block = Union[Heading, Text, Table, Code]


def to_text(blocks: Sequence[Block]) -> str:
    """Plain text: underlined headings, aligned tables, code indented by 4 spaces."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["", block.text, "-" * len(block.text)]
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Code):
            out += ["    " + line if line else "" for line in block.text.splitlines()]
        else:
            if block.title:
                out.append(block.title + ":")
            out += _aligned(block)
    return "\n".join(out).lstrip("\n") + "\n"


def _aligned(table: Table) -> list[str]:
    widths = [len(c) for c in table.columns]
    for row in table.rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if i in table.numeric else c.ljust(widths[i])
            for i, c in enumerate(cells)
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(table.columns), "  " + "  ".join("-" * w for w in widths)] + [
        line(r) for r in table.rows
    ]


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown: ## headings, pipe tables, fenced code."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["", f"## {block.text}", ""]
        elif isinstance(block, Text):
            out += [block.text, ""]
        elif isinstance(block, Code):
            out += [f"```{block.language}", block.text, "```", ""]
        else:
            if block.title:
                out += [f"**{block.title}**", ""]
            out.append("| " + " | ".join(block.columns) + " |")
            out.append(
                "| "
                + " | ".join(
                    "---:" if i in block.numeric else "---" for i in range(len(block.columns))
                )
                + " |"
            )
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
    return "\n".join(out).strip("\n") + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def print_rich(blocks: Sequence[Block], console: Any) -> None:
    """Print on a rich Console: tables drawn, code never wrapped nor cut.

    A code line longer than the terminal reaches it whole (the terminal folds it on screen),
    so SQL copied from an 80-column terminal is the SQL that was printed.
    """
    for block, renderable in zip(blocks, to_rich(blocks)):
        console.print(renderable, soft_wrap=isinstance(block, Code))


def to_rich(blocks: Sequence[Block]) -> list[Any]:
    """Renderables for a rich Console (imports rich: the ``cli`` extra).

    Code is indented text; print it with ``soft_wrap=True`` (:func:`print_rich`), or rich
    wraps it at the terminal's width.
    """
    from rich.table import Table as RichTable
    from rich.text import Text as RichText

    out: list[Any] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(RichText("\n" + block.text, style="bold underline"))
        elif isinstance(block, Text):
            out.append(RichText(block.text))
        elif isinstance(block, Code):
            code = "\n".join("    " + line if line else "" for line in block.text.splitlines())
            out.append(RichText(code, style="cyan"))
        else:
            title = RichText(block.title) if block.title else None
            table = RichTable(title=title, title_justify="left", header_style="bold")
            for i, name in enumerate(block.columns):
                table.add_column(
                    name,
                    justify="right" if i in block.numeric else "left",
                    no_wrap=i in block.no_wrap,
                )
            for row in block.rows:
                table.add_row(*(RichText(cell) for cell in row))
            out.append(table)
    return out
