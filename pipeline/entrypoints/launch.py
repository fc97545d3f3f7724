"""Start every server of one deployment file, wait until each reports healthy, stop them cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from pipeline.config import DvDConfig, load_config
from pipeline.config.fields import wildcard
from pipeline.entrypoints.health import LaunchError, StartInterrupted, check_owner, wait_healthy
from pipeline.runtime.process import launched_env
from pipeline.runtime.secrets import secret_env, split_secrets
from pipeline.runtime.tls import TlsDial, client_identity_error
from pipeline.wire.curve import launcher_key_file

@dataclass
class ServerProcess:
    """One child process and where its health service answers."""

    name: str
    argv: list[str]
    health_address: str
    log_path: Path | None = None
    api_key: str = ""  # sent with the Admin call that checks who answers at health_address
    tls: TlsDial | None = None  # how to reach health_address when it serves TLS
    process: subprocess.Popen | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _terminated: bool = field(default=False, repr=False)

    def start(self, env: dict[str, str] | None) -> None:
        """Start the process. Main thread only: the server asks the kernel to end it when the thread
        that forked it exits (PR_SET_PDEATHSIG follows threads, not processes; see die_with_parent),
        so a server started from a worker thread would die with that thread."""
        if threading.current_thread() is not threading.main_thread():
            raise LaunchError(
                f"{self.name}: servers must be started from the main thread (a server dies with the thread that started it)"
            )
        output: Any = None
        if self.log_path is not None:  # a restarted server's log follows its earlier one
            self._log_file = open(self.log_path, "ab" if self.process is not None else "wb")
            output = self._log_file
        self._terminated = False
        self.process = subprocess.Popen(self.argv, env=launched_env(env), stdout=output, stderr=output)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_note(self) -> str:
        """How the process ended ("exit status 1", "killed by SIGSEGV"), or "still running"."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return "still running"
        return f"exit status {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait until this process (not another one holding its port) is healthy; on failure a
        LaunchError with how the process ended and its log tail. StartInterrupted once `cancelled()`."""
        try:
            wait_healthy(self.health_address, timeout_s, lambda: self.alive, cancelled, self.tls)
            check_owner(self.health_address, self.process.pid, self.api_key, self.tls)
        except StartInterrupted:
            raise
        except LaunchError as exc:
            raise LaunchError(f"{self.name}: {exc} ({self.exit_note()})\n{self.log_tail()}") from None

    def terminate(self) -> None:
        """Ask the process to shut down (once; a second SIGTERM could cut its clean-up short)."""
        if self.alive and not self._terminated:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float) -> None:
        """Terminate and wait; SIGKILL if it is still running after timeout_s."""
        self.terminate()
        if self.process is not None:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class Deployment:
    """The servers of one deployment file, as child processes of this one."""

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        overrides: dict[str, Any] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config_path = str(config_path)
        self.overrides = dict(overrides or {})
        self.config: DvDConfig = load_config(self.config_path, self.overrides)
        self.made_key_file = launcher_key_file(self.config.transport.auth, self.config.transport.curve_key_file)
        if self.made_key_file is not None:  # a path on the servers' command lines; the file is private
            self.overrides["transport.curve_key_file"] = str(self.made_key_file)
            self.config = load_config(self.config_path, self.overrides)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.env = {**os.environ, **(env or {})}
        self.launch_env = {**self.env, **secret_env(split_secrets(self.overrides)[1])}  # what servers start with
        self.servers = self._plan()

    @property
    def address(self) -> str:
        """The public gRPC address."""
        return f"{self.config.language.host}:{self.config.language.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible HTTP API ("" when language.http_port is 0); a wildcard
        bind address is reached on localhost."""
        lc = self.config.language
        if not lc.http_port:
            return ""
        host = "localhost" if wildcard(lc.host) else f"[{lc.host}]" if ":" in lc.host else lc.host
        return f"{'https' if lc.tls_cert else 'http'}://{host}:{lc.http_port}"

    def _plan(self) -> list[ServerProcess]:
        public, _ = split_secrets(self.overrides)  # secrets go by environment (start), never on a command line
        settings = [f"--set={key}={_yaml(value)}" for key, value in public.items()]
        common = ["--config", self.config_path, *settings]
        vc, lc = self.config.vision, self.config.language
        servers = []
        if self.config.mode == "decoupled" and not lc.vision_servers:
            for i in range(vc.replicas):
                argv = [sys.executable, "-m", "vision_server", *common, "--replica", str(i)]
                servers.append(ServerProcess(f"vision-{i}", argv, f"{vc.host}:{vc.grpc_port + i}"))
        if self.config.mode == "colocated":
            name, argv = "colocated", [sys.executable, "-m", "pipeline.entrypoints.colocated", *common]
        else:
            name, argv = "language", [sys.executable, "-m", "language_server", *common]
        servers.append(ServerProcess(name, argv, self.address, api_key=lc.api_key, tls=TlsDial.of(lc)))
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for server in servers:
                server.log_path = self.log_dir / f"{server.name}.log"
        return servers

    def start(self, timeout_s: float = 300.0, cancel: threading.Event | None = None) -> Deployment:
        """Start all servers and wait until every one is healthy; on failure stop them all.

        Setting `cancel` (from a signal handler, say) ends the wait with StartInterrupted."""
        start_together([self], timeout_s, cancel)
        return self

    def _prepare(self) -> None:
        running = [server.name for server in self.servers if server.process is not None and server.alive]
        if running:
            raise LaunchError(f"{', '.join(running)}: already started (a `with Deployment(...)` block starts it)")
        if self.config.model.path == "tiny":
            from pipeline.model.tiny_model import tiny_model_dir

            tiny_model_dir("original" if self.config.model.format == "original" else "hf")
        self._check_launcher_identity()

    def _check_launcher_identity(self) -> None:
        """Under mutual TLS the launcher presents the server's own certificate (TlsDial): refuse to
        start, rather than wait out the timeout, when tls_client_ca would not accept it."""
        lc = self.config.language
        if not lc.tls_client_ca:
            return
        why = client_identity_error(lc.tls_cert, lc.tls_key, lc.tls_client_ca)
        if why is not None:
            raise LaunchError(
                f"language.tls_client_ca ({lc.tls_client_ca}) does not accept language.tls_cert ({lc.tls_cert}) "
                f"as a client certificate: {why}. The launcher presents tls_cert and tls_key to check the "
                "server's health, so under mutual TLS tls_cert must be signed by tls_client_ca and allow "
                "client authentication (extendedKeyUsage clientAuth, or no extendedKeyUsage)"
            )

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every server, then SIGKILL whatever is left after the timeout."""
        stop_together([self], timeout_s)

    def failed(self) -> ServerProcess | None:
        """A server that has exited, if any."""
        return next((s for s in self.servers if s.process is not None and not s.alive), None)

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_together(deployments: list[Deployment], timeout_s: float = 300.0, cancel: threading.Event | None = None) -> None:
    """Start every server of several deployments at once, so that their start-ups overlap, and wait
    until all are healthy; on any failure stop them all. StartInterrupted once `cancel` is set."""
    cancelled = cancel.is_set if cancel is not None else (lambda: False)
    for deployment in deployments:
        deployment._prepare()
    try:
        for deployment in deployments:
            for server in deployment.servers:
                server.start(deployment.launch_env)
        deadline = time.monotonic() + timeout_s
        for deployment in deployments:
            for server in deployment.servers:
                server.wait_ready(deadline - time.monotonic(), cancelled)
    except BaseException:
        stop_together(deployments)
        raise


def stop_together(deployments: list[Deployment], timeout_s: float = 15.0) -> None:
    """SIGTERM every server of several deployments, then SIGKILL whatever is left after the timeout
    (their shut-downs overlap)."""
    servers = [server for deployment in deployments for server in reversed(deployment.servers)]
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop(timeout_s)
    _sweep_shm_segments()
    for deployment in deployments:
        if deployment.made_key_file is not None:
            shutil.rmtree(deployment.made_key_file.parent, ignore_errors=True)


def _sweep_shm_segments() -> None:
    """Unlink the shm transport's segments left by servers that were killed before their clean-up."""
    from pipeline.transport.shm_segments import sweep_stale_segments

    try:
        sweep_stale_segments()
    except OSError:  # someone else's segment we may not unlink; nothing of ours is left behind by it
        pass


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
