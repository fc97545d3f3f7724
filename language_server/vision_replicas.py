"""Which vision server takes a job, and what happens when it does not answer.

With several vision servers (replicas), each job goes to the reachable one with the fewest
outstanding tiles. A replica is treated as down when it does not take a job within the send
timeout, or leaves a job unanswered for `vision.replica_timeout_s` and then fails a health check
(a busy replica still answers it; a hung or dead one does not; replicas named in
`language.vision_servers` have no known health address and count as down on the timeout alone).
The job is then sent to another replica, and the replica is skipped for a while. Whichever
answer to a job arrives first is used.

A replica whose job connection drops (a killed process's kernel closes it at once) is down until
it connects again: its jobs still waiting for a first answer go to another replica (vision jobs
are idempotent), or fail UNAVAILABLE naming it when no other replica is left to try, and jobs
whose answer was arriving in parts fail UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from language_server.feature_inbox import FeatureInbox, PendingJob, ReplicaLost
from pipeline.config import DvDConfig
from pipeline.errors import DeadlineExceeded, Unavailable
from pipeline.wire import Features, JobStatus
from pipeline.wire.channels import PushChannel
from pipeline.wire.curve import deployment_keys

log = logging.getLogger(__name__)
DOWN_S = 10.0  # a replica that failed a job is skipped this long
PROBE_S = 2.0  # a health check that takes longer counts as failed


@dataclass
class Replica:
    endpoint: str
    health: grpc.Channel | None = None  # the replica's gRPC health service, when its address is known
    channel: PushChannel = field(init=False, repr=False)
    outstanding_tiles: int = 0
    down_until: float = 0.0  # time.monotonic(); skipped before this
    connected: bool = True  # False from a dropped job connection until it is back
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def answers_health_check(self) -> bool:
        if self.health is None:
            return False
        try:
            reply = health_pb2_grpc.HealthStub(self.health).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_S)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def push(self, frame: bytes) -> bool:
        with self.send_lock:
            return self.channel.send([frame])


@dataclass(eq=False)
class Assignment:
    """A job's estimated tiles, counted against the replica it was last sent to (None: none now)."""

    tiles: int
    replica: Replica | None = None


class VisionReplicas:
    """Sends jobs to the vision servers, picking one and moving a job on when it goes unanswered."""

    def __init__(self, config: DvDConfig, inbox: FeatureInbox) -> None:
        self.inbox = inbox
        self.timeout_s = config.language.vision_timeout_s
        self.replica_timeout_s = config.vision.replica_timeout_s
        self._lock = threading.Lock()  # guards the replicas' outstanding tiles and down times
        self._keys = deployment_keys(config.transport.auth, config.transport.curve_key_file)
        self.replicas = [self._connect(endpoint, _health_channel(config, i))
                         for i, endpoint in enumerate(config.vision_endpoints)]

    def _connect(self, endpoint: str, health: grpc.Channel | None) -> Replica:
        replica = Replica(endpoint, health)
        replica.channel = PushChannel(f"tcp://{endpoint}", on_peer=lambda up: self._peer_changed(replica, up),
                                      keys=self._keys)
        return replica

    def _peer_changed(self, replica: Replica, up: bool) -> None:
        """From the channel's monitor thread: the job connection to `replica` came up or dropped."""
        with self._lock:
            was, replica.connected = replica.connected, up
            if up:
                replica.down_until = 0.0
        if up and not was:
            log.info("vision server %s is connected again", replica.endpoint)
        elif not up:
            lost = self.inbox.lose_source(replica.endpoint)
            log.warning("vision server %s closed its job connection; %d jobs in flight there are moved or failed",
                        replica.endpoint, lost)

    def close(self) -> None:
        for replica in self.replicas:
            replica.channel.close()
            if replica.health is not None:
                replica.health.close()

    async def first_answer(
        self, job_id: str, frame: bytes, pending: PendingJob, assignment: Assignment, deadline: float
    ) -> Features:
        """Send an encoded job and return the first part of its answer (maybe a failed status).
        A replica that leaves it unanswered is marked down and the job sent to another; one that
        answers RESOURCE_EXHAUSTED passes it on too, unless it was the last to try. `deadline`
        is the event loop's time by which some answer must have come."""
        loop = asyncio.get_running_loop()
        tried: set[str] = set()
        while True:
            replica = await self._send(job_id, frame, pending, assignment, tried)
            tried.add(replica.endpoint)
            last_chance = len(tried) >= len(self.replicas)
            try:
                features = await self._answer(pending, replica, deadline, last_chance)
            except ReplicaLost:
                if last_chance:
                    raise
                pending.future = loop.create_future()
                continue
            if features is None:
                self._mark_down(replica, f"left job {job_id} unanswered and failed a health check")
                continue
            if features.header.status == JobStatus.RESOURCE_EXHAUSTED and not last_chance:
                pending.future = loop.create_future()
                continue
            return features

    def assign(self, assignment: Assignment, replica: Replica | None) -> None:
        """Move a job's tiles to `replica`'s outstanding count (None: the job is over)."""
        with self._lock:
            self._move(assignment, replica)

    async def _answer(self, pending: PendingJob, replica: Replica, deadline: float, last_chance: bool) -> Features | None:
        """The job's answer, or None when `replica` left it unanswered for replica_timeout_s and then
        failed a health check. On the last replica only the overall deadline applies."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"no vision server answered within {self.timeout_s:g} s")
            try:
                wait = remaining if last_chance else min(remaining, self.replica_timeout_s)
                return await asyncio.wait_for(asyncio.shield(pending.future), wait)
            except asyncio.TimeoutError:
                pass
            if not last_chance and not await asyncio.to_thread(replica.answers_health_check):
                return None

    async def _send(
        self, job_id: str, frame: bytes, pending: PendingJob, assignment: Assignment, tried: set[str]
    ) -> Replica:
        """Hand the job to the best replica that takes it; Unavailable if none does."""
        refused: list[str] = []
        while True:
            with self._lock:
                replica = self._choose(tried | set(refused))
                if replica is None:
                    break
                self._move(assignment, replica)
            pending.source = replica.endpoint
            self.inbox.expect(job_id, pending)
            if await asyncio.to_thread(replica.push, frame):
                return replica
            refused.append(replica.endpoint)
            self._mark_down(replica, "did not take a job")
        raise Unavailable(f"no vision server took the job (tried {', '.join(sorted(tried | set(refused)))})")

    def _choose(self, excluded: set[str]) -> Replica | None:
        """The replica with the fewest outstanding tiles, preferring those not marked down. Holds _lock."""
        candidates = [r for r in self.replicas if r.endpoint not in excluded]
        if not candidates:
            return None
        now = time.monotonic()
        return min(candidates, key=lambda r: (not r.connected or r.down_until > now, r.outstanding_tiles))

    @staticmethod
    def _move(assignment: Assignment, replica: Replica | None) -> None:
        """Holds _lock."""
        if assignment.replica is not None:
            assignment.replica.outstanding_tiles -= assignment.tiles
        assignment.replica = replica
        if replica is not None:
            replica.outstanding_tiles += assignment.tiles

    def _mark_down(self, replica: Replica, reason: str) -> None:
        with self._lock:
            replica.down_until = time.monotonic() + DOWN_S
        log.warning("vision server %s %s; trying others", replica.endpoint, reason)


def _health_channel(config: DvDConfig, index: int) -> grpc.Channel | None:
    """A channel to replica `index`'s health service when the endpoints come from the vision section."""
    if config.language.vision_servers:
        return None
    vc = config.vision
    return grpc.insecure_channel(f"{vc.host}:{vc.grpc_port + index}")
