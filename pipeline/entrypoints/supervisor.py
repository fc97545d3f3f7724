"""Keeps a started deployment's servers running: a server that exits unexpectedly is started again
on the same ports, after a backoff, and the rest of the deployment goes on serving meanwhile (with
its vision server gone, the language server still serves text and fails image requests
UNAVAILABLE). A server that keeps exiting, more than `max_restarts` times within `window_s`,
ends the deployment instead."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from pipeline.entrypoints.launch import Deployment, LaunchError, ServerProcess, StartInterrupted
from pipeline.transport.shm_segments import sweep_stale_segments


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # before the 1st, 2nd, ... restart within the window
    max_restarts: int = 5  # per server within window_s; one more exit ends the deployment
    window_s: float = 300.0
    ready_timeout_s: float = 300.0  # for a restarted server to report healthy


class Supervisor:
    """Call `check()` from the main thread (servers die with the thread that started them)."""

    def __init__(
        self, deployment: Deployment, stop: threading.Event, say: Callable[[str], None],
        policy: RestartPolicy = RestartPolicy(),
    ) -> None:
        self.deployment = deployment
        self.stop = stop
        self.say = say
        self.policy = policy
        self.restarts: dict[str, deque[float]] = {server.name: deque() for server in deployment.servers}

    def check(self) -> str | None:
        """Restart every server that has exited; why the deployment must end, or None."""
        for server in self.deployment.servers:
            if server.process is None or server.alive or self.stop.is_set():
                continue
            reason = self._restart(server)
            if reason is not None:
                return reason
        return None

    def _restart(self, server: ServerProcess) -> str | None:
        note = server.exit_note()
        history = self.restarts[server.name]
        now = time.monotonic()
        while history and now - history[0] > self.policy.window_s:
            history.popleft()
        if len(history) >= self.policy.max_restarts:
            return (f"{server.name} exited ({note}) after {len(history)} restarts within "
                    f"{self.policy.window_s:g} s")
        delay = self.policy.backoff_s[min(len(history), len(self.policy.backoff_s) - 1)]
        self.say(f"dvd: {server.name} exited ({note}); starting it again in {delay:g} s on the same ports")
        server.stop(0)  # closes its log; the process has ended
        sweep_stale_segments()  # shared memory it created and can no longer free
        history.append(now)
        if self.stop.wait(delay):
            return None
        try:
            server.start(self.deployment.launch_env)
            server.wait_ready(self.policy.ready_timeout_s, self.stop.is_set)
        except StartInterrupted:
            return None
        except LaunchError as exc:  # counted as a restart: the next check tries again, or gives up
            self.say(f"dvd: {server.name} did not come back: {str(exc).splitlines()[0]}")
            return None
        self.say(f"dvd: {server.name} is serving again ({len(history)} restarts within "
                 f"{self.policy.window_s:g} s)")
        return None
