"""Polling with a deadline: the tests' one way to wait for something another thread or process does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; its final value."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        pause.wait(interval_s)
    return True
