"""Markdown tables for the benchmark scripts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A padded Markdown table, readable both printed and rendered."""
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(len(head))]

    def fmt(r: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"

    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def publish(path: Path, title: str, preface: str, command: str, table: str) -> None:
    """Print a benchmark table and save it, with the command that reproduces it, as Markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{preface}\nReproduce with:\n\n    {command}\n\n{table}\n")
    print(table)
    print(f"wrote {path}")
