"""Write one benchmark's table into its own section of ``benchmarks/RESULTS.md``.

Each benchmark owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; running
it again replaces that section and leaves the others alone.
"""

from __future__ import annotations

import platform
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """One line naming the hardware the numbers came from."""
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_section(name: str, markdown: str, path: Path | None = None) -> None:
    """Replace (or append) section ``name`` of ``path`` (default benchmarks/RESULTS.md)."""
    path = path or RESULTS
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n{markdown.strip()}\n\n_Measured {date.today()} on {machine()}._\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + body + after
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
