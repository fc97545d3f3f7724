"""Reading one series from a server's Prometheus /metrics page."""

from __future__ import annotations

import urllib.request


def scrape(host: str, port: int, series: str, default: float | None = None) -> float:
    """The value of `series` (name and labels, as the page writes them); `default` when it is absent
    (None: an AssertionError)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    if default is None:
        raise AssertionError(f"no {series} on http://{host}:{port}/metrics")
    return default


def language_metric(deployment, series: str, default: float | None = None) -> float:  # noqa: ANN001
    """One series of the language server's /metrics."""
    lc = deployment.config.language
    return scrape(lc.host, lc.metrics_port, series, default)
