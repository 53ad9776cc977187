"""Rewrite the settings tables of docs/configuration.md from the dataclasses that declare them.

Run ``make docs`` after adding or changing a setting; ``tests/unit/core/test_config.py`` fails
while the page and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bedside.aggregator.config import AggregatorConfig
from bedside.config import markdown_table
from bedside.edge.config import AgentConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
TABLES = {"aggregator.toml": AggregatorConfig, "agent.toml": AgentConfig}


def render(text: str) -> str:
    for name, cls in TABLES.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, found, rest = text.partition(start)
        if not found:
            raise SystemExit(f"{DOC}: no {start} marker")
        _, _, tail = rest.partition(end)
        text = f"{head}{start}\n{markdown_table(cls)}\n{end}{tail}"
    return text


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    print(f"wrote {DOC}", file=sys.stderr)
