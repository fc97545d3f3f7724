"""Benchmark reports: one JSON file, a Markdown table and a PNG plot per run."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import os

    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=_plain))
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A GitHub Markdown table; `columns` are (key, header) pairs."""
    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def _plain(value: Any) -> Any:
    if hasattr(value, "ListFields"):
        return {f.name: v for f, v in value.ListFields()}
    return str(value)


def bar_plot(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> Path:
    """Grouped bar chart (one group per x label, one bar per series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        positions = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, values, width, label=label)
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str) -> None:
        self.total = max(total, 1)
        self.label = label
        self.started = time.perf_counter()

    def __call__(self, done: int) -> None:
        import sys

        width = 30
        filled = int(width * done / self.total)
        elapsed = time.perf_counter() - self.started
        sys.stderr.write(f"\r{self.label:<40} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:5.0f}s")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
