"""The reliability figures: what the fuzz, load, fault and key-leak tests tried and found.

Tests add to :data:`FIGURES`; the run prints the tally at the end and writes it
to ``test-artifacts/reliability-figures.json`` (the manual's reliability page quotes one run).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

FIGURES: Counter[str] = Counter()

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def count(name: str, amount: int = 1) -> None:
    FIGURES[name] += amount


def count_max(name: str, value: int) -> None:
    """Keep the largest ``value`` seen under ``name`` (a peak, not a sum)."""
    FIGURES[name] = max(FIGURES[name], value)


def write_figures() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "reliability-figures.json"
    path.write_text(json.dumps(dict(sorted(FIGURES.items())), indent=2) + "\n")
    return path
