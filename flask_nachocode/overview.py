"""The inspector's overview: deliveries per period by outcome, as numbers and as
the geometry of a server-rendered SVG bar chart.

Kept apart from :mod:`.inspector` (the views and their protection) because it is
arithmetic on :func:`~flask_nachocode.reads.count_by_period`'s counts, which a
test can check without a request. The chart is drawn by the template from these
numbers: no script, no inline style (the inspector's CSP forbids both), colours
from ``inspector.css`` by outcome class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from . import reads
from .store import Store
from .tables import OUTCOMES

#: The chart's drawing area in SVG units; the browser scales it to the page's width.
WIDTH = 720
HEIGHT = 200
#: Room on the left for the count axis and below for the period labels.
LEFT = 40
BOTTOM = 22
TOP = 8


@dataclass(frozen=True)
class Bar:
    """One outcome's part of one period's stacked bar."""

    outcome: str
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass
class Period:
    """One hour or day: its counts by outcome and its bar."""

    start: datetime
    label: str
    counts: dict[str, int] = field(default_factory=dict)
    bars: list[Bar] = field(default_factory=list)
    #: Where the period's label is drawn, and whether it is (every label would crowd 24 hours).
    label_x: float = 0.0
    show_label: bool = True

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Chart:
    """One chart of the overview: its periods, the outcomes that occur, the axis."""

    title: str
    period: Literal["hour", "day"]
    periods: list[Period]
    outcomes: list[str]
    #: The count axis: (value, y) of each gridline.
    ticks: list[tuple[int, float]]
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def total(self) -> int:
        return sum(p.total for p in self.periods)


def overview(store: Store, now: datetime) -> list[Chart]:
    """The last 24 hours by hour and the last 7 days by day (UTC), counting each
    delivery once, as its original, under its latest outcome (as the list does)."""
    hour = now.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    day = hour.replace(hour=0)
    hours = [hour - timedelta(hours=n) for n in range(23, -1, -1)]
    days = [day - timedelta(days=n) for n in range(6, -1, -1)]
    return [
        chart("Last 24 hours, per hour (UTC)", store, "hour", hours, "%H:00", every=3),
        chart("Last 7 days, per day (UTC)", store, "day", days, "%a %m-%d", every=1),
    ]


def chart(
    title: str,
    store: Store,
    period: Literal["hour", "day"],
    starts: list[datetime],
    label_format: str,
    *,
    every: int,
) -> Chart:
    """Count ``period``s from ``starts[0]`` on, and lay them out as stacked bars."""
    where = reads.DeliveryFilter(received_from=starts[0])
    periods = {start: Period(start, start.strftime(label_format)) for start in starts}
    for counted in reads.count_by_period(store, where, period=period):
        target = periods.get(counted.start)
        if target is not None:  # a clock ahead of ours leaves nothing outside the range
            target.counts[counted.outcome] = target.counts.get(counted.outcome, 0) + counted.count
    ordered = list(periods.values())
    present = [o for o in OUTCOMES if any(p.counts.get(o) for p in ordered)]
    top = _axis_top(max((p.total for p in ordered), default=0))
    plot_height = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT) / len(ordered)
    width = slot * 0.7
    for index, p in enumerate(ordered):
        x = LEFT + index * slot + (slot - width) / 2
        p.label_x = x + width / 2
        p.show_label = index % every == 0
        base = float(HEIGHT - BOTTOM)
        for outcome in present:
            count = p.counts.get(outcome, 0)
            if not count:
                continue
            height = plot_height * count / top
            base -= height
            p.bars.append(
                Bar(outcome, count, round(x, 2), round(base, 2), round(width, 2), round(height, 2))
            )
    steps = 4
    ticks = [
        (top * n // steps, round(HEIGHT - BOTTOM - plot_height * n / steps, 2))
        for n in range(steps + 1)
    ]
    return Chart(title, period, ordered, present, ticks)


def _axis_top(largest: int) -> int:
    """The count at the top of the axis: a round number of at least ``largest``
    that four gridlines divide into whole numbers."""
    top = 4
    while top < largest:
        for factor in (2, 2.5, 2):
            top = int(top * factor)
            if top >= largest:
                break
    return top
