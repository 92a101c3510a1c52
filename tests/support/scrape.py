"""Reading a scrape of ``{prefix}/metrics`` the way Prometheus does (prometheus_client's
own parser), and what changed between two scrapes."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: NACHOCODE_METRICS_TOKEN of the tests' apps.
METRICS_TOKEN = "metrics-token-3b9d7e51"
#: The config that switches metrics and their route on.
METRICS_CONFIG = {
    "NACHOCODE_METRICS": True,
    "NACHOCODE_METRICS_ROUTE": True,
    "NACHOCODE_METRICS_TOKEN": METRICS_TOKEN,
}
#: Samples by (sample name, sorted label pairs).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: Any, prefix: str = "/nachocode") -> Samples:
    """Scrape an app's route through its test client (or ``requests`` and a base URL)."""
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    if isinstance(client, str):
        import requests

        answer = requests.get(f"{client}{prefix}/metrics", headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        return parse(answer.text)
    answer = client.get(f"{prefix}/metrics", headers=headers)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return parse(answer.get_data(as_text=True))


def counted(before: Samples, after: Samples) -> dict[str, dict[tuple[str, ...], float]]:
    """What the counters (and histogram counts) went up by, per sample name, by label
    values in label-name order; only what changed."""
    changes: dict[str, dict[tuple[str, ...], float]] = {}
    for (name, labels), value in after.items():
        if not name.endswith(("_total", "_count")):
            continue
        change = value - before.get((name, labels), 0.0)
        if change:
            changes.setdefault(name, {})[tuple(value for _, value in labels)] = change
    return changes


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and wanted <= set(pairs))
