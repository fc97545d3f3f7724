"""The vision server process: jobs in over ZMQ, features out over the configured transport.

Four kinds of thread share a VisionWorker:

    main         receive and decode jobs; admit them (or answer RESOURCE_EXHAUSTED when
                 max_queued_jobs are already waiting) and hand them to the preprocess pool
    preprocess   limits, decode, tile (or a cache hit) -> the batcher, or straight to the outbox
    batch        TileBatcher -> one encoder run over the tiles of many jobs -> the outbox
                 (a job that spans several encoder chunks is answered in parts, chunk by chunk)
    send         header + rows -> each job's reply address (one lane per requester; outbox.py)

so decoding, encoding and sending of different jobs overlap. A job holds its admission slot
until its answer is computed and queued for sending, not until it is sent, so a requester
that stops taking answers cannot hold the slots that everyone else needs.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc

from pipeline.wire.channels import PullChannel
from pipeline.wire.curve import deployment_keys
from pipeline.config import DvDConfig
from pipeline.runtime.grpc_server import (
    SERVING, AdminService, DecodeErrorInterceptor, add_health_and_reflection, parameter_bytes, server_info,
)
from pipeline.wire import JobStatus, VisionJob, WireError
from proto.dvd.v1 import admin_pb2_grpc
from vision_server import metrics
from vision_server.batcher import TileBatcher
from vision_server.jobs import JobError, PreparedJob, max_job_bytes
from vision_server.answers import JobResult
from vision_server.outbox import Outbox
from vision_server.worker import VisionWorker

log = logging.getLogger(__name__)
POLL_S = 0.1
JOIN_S = 5.0


class VisionServer:
    """Owns the worker, the job socket, the batcher, the feature sender and the health endpoint."""

    def __init__(self, config: DvDConfig, replica: int = 0) -> None:
        self.config = config
        self.replica = replica
        vc = config.vision
        self.server_id = f"vision-{replica}@{vc.host}:{vc.job_port + replica}"
        self.outbox = Outbox(config.transport, max_features=vc.max_queued_jobs)  # first: a bad transport fails fast
        self.worker = VisionWorker(config, replica, self.server_id)
        self.batcher = TileBatcher(vc.max_batch_tiles, vc.max_wait_ms)
        keys = deployment_keys(config.transport.auth, config.transport.curve_key_file)
        self.jobs = PullChannel(
            f"tcp://{vc.host}:{vc.job_port + replica}", max_message_bytes=max_job_bytes(config), keys=keys
        )
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._stop = threading.Event()
        self._batch_thread = threading.Thread(target=self._batch_loop, name="vision-batch", daemon=True)
        self._grpc = self._start_grpc()

    def _start_grpc(self) -> grpc.Server:
        vc = self.config.vision
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2),
            interceptors=[DecodeErrorInterceptor()],
            options=[("grpc.so_reuseport", 0)],
        )
        info = server_info(
            "vision",
            self.worker.checkpoint,
            vc.dtype,
            self.worker.device,
            self.worker.loaded_tensors,
            parameter_bytes(self.worker.modules),
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(info), server)
        health = add_health_and_reflection(server, ["dvd.v1.Admin"], aio=False)
        address = f"{vc.host}:{vc.grpc_port + self.replica}"
        if not server.add_insecure_port(address):
            raise RuntimeError(f"cannot bind the vision gRPC service to {address}")
        server.start()
        health.set("", SERVING)
        return server

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Receive jobs until stop() is called, then shut every thread down."""
        self._batch_thread.start()
        log.info("vision server ready", extra={"server_id": self.server_id, "jobs": self.jobs.address})
        try:
            while not self._stop.is_set():
                message = self.jobs.recv(POLL_S)
                if message is not None:
                    self._admit(message, time.time())
        finally:
            self.worker.close()
            self._batch_thread.join(JOIN_S)
            self.outbox.close(JOIN_S)
            self._grpc.stop(grace=1.0)
            self.jobs.close()

    # ----- main thread -------------------------------------------------------------------
    def _admit(self, message: list[bytes], arrived: float) -> None:
        try:
            job = VisionJob.decode(message[0])
        except (WireError, IndexError) as exc:
            log.warning("dropped an undecodable job: %s", exc)
            metrics.JOBS.labels("undecodable").inc()
            return
        if self.outbox.unreachable(job.reply_to):
            log.warning("dropped a job: its reply address %s did not take its last answer in time", job.reply_to,
                        extra={"job_id": job.job_id})
            metrics.JOBS.labels("undelivered").inc()
            return
        limit = self.config.vision.max_queued_jobs
        with self._admitted_lock:
            admitted = self._admitted < limit
            if admitted:
                self._admitted += 1
                metrics.QUEUE_DEPTH.set(self._admitted)
        if not admitted:
            metrics.JOBS.labels("resource_exhausted").inc()
            message = f"{limit} jobs are already queued on {self.server_id}"
            self.outbox.put(JobResult.error(job, JobStatus.RESOURCE_EXHAUSTED, message, self.server_id))
            return
        try:
            self.worker.pool.submit(self._prepare, job, arrived)
        except RuntimeError:  # the pool is shutting down
            self._finished()

    # ----- preprocess pool -----------------------------------------------------------------
    def _prepare(self, job: VisionJob, arrived: float) -> None:
        batched = False
        try:
            prepared: PreparedJob = self.worker.prepare(job, arrived)
            if prepared.needs_encoder:
                self.batcher.put(prepared)
                batched = True
            else:
                self.outbox.put(self.worker.complete(prepared))
        except Exception:  # noqa: BLE001 - a Future would swallow it, and the slot must be freed
            log.exception("could not answer a job", extra={"job_id": job.job_id})
        finally:
            if not batched:
                self._finished()

    # ----- batch thread --------------------------------------------------------------------
    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            batch = self.batcher.next_batch(POLL_S)
            if batch:
                self._answer_batch(batch)

    def _answer_batch(self, batch: list[PreparedJob]) -> None:
        """Encode one batch and queue its answers; never raises, and frees every job's slot."""
        try:
            try:
                on_part = self.outbox.put if self.config.vision.stream_features else None
                results = self.worker.run_batch(batch, on_part)
            except Exception:  # noqa: BLE001 - run_batch answers per job; this is a last resort
                log.exception("a vision batch failed")
                results = [self.worker.complete(_failed(p)) for p in batch]
            for result in results:
                self.outbox.put(result)
        except Exception:  # noqa: BLE001 - the batch thread must survive anything
            log.exception("could not answer a vision batch")
        finally:
            for _ in batch:
                self._finished()

    # ----- any thread ---------------------------------------------------------------------
    def _finished(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1
            metrics.QUEUE_DEPTH.set(self._admitted)


def _failed(prepared: PreparedJob) -> PreparedJob:
    prepared.error = JobError(JobStatus.INTERNAL, "the vision server failed on this batch")
    return prepared
