"""Markdown tables for the benchmark scripts."""

from __future__ import annotations

import argparse
import re
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


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def replace_section(path: Path, key: str, text: str) -> None:
    """Put ``text`` between the ``key`` markers of a Markdown file (appended if they are missing)."""
    start, end = _markers(key)
    old = path.read_text() if path.exists() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def marked_sections(path: Path) -> str:
    """Every marked section of a file, to carry over when the rest of it is regenerated."""
    if not path.exists():
        return ""
    blocks = re.findall(r"<!-- (\S+):start -->.*?<!-- \1:end -->", path.read_text(), flags=re.S)
    text = path.read_text()
    return "\n\n".join(text[text.index(_markers(k)[0]) : text.index(_markers(k)[1]) + len(_markers(k)[1])] for k in blocks)


def bench_arguments(description: str, root: Path) -> argparse.ArgumentParser:
    """The options every real-model benchmark takes: which cases, the model cache and where docs go."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--cases", default="digits,efficientnet,minilm")
    ap.add_argument("--cache", type=Path, default=root / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=root / "docs")
    return ap
