"""How every benchmark reports: a markdown table (printed and saved) and its raw rows as JSON.

Both files go to ``benchmarks/results/<stem>.{md,json}``; ``stem`` carries the ``_quick`` suffix of
a ``--quick`` run (:func:`result_stem`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from corpora import RESULTS


def result_stem(name: str, quick: bool) -> str:
    """``name`` for a full run, ``name_quick`` for a ``--quick`` smoke run."""
    return f"{name}_quick" if quick else name


def markdown_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], align: Sequence[str] | None = None
) -> str:
    """A GitHub markdown table, one line per row of already formatted cells, ending in a newline.

    ``align``: the separator cell of each column (``"---"`` left, ``"---:"`` right); all left by
    default.
    """
    align = ["---"] * len(columns) if align is None else list(align)
    if len(align) != len(columns):
        raise ValueError(f"{len(align)} alignments for {len(columns)} columns")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(stem: str, markdown: str, payload: object, *, indent: int = 1) -> Path:
    """Write ``markdown`` to ``<stem>.md`` and ``payload`` as JSON to ``<stem>.json`` under
    ``benchmarks/results/``; returns the path without suffix."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(markdown)
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=indent))
    return RESULTS / stem
