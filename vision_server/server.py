"""The vision server process: jobs in over ZMQ, features out over the configured transport."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import replace

import grpc
import torch

from pipeline.channels import PullChannel
from pipeline.checkpoint import open_model
from pipeline.config import DvDConfig
from pipeline.grpc_server import SERVING, AdminService, add_health_and_reflection, server_info
from pipeline.transport import TransportError, create_backend
from pipeline.wire import (
    FeatureHeader,
    JobStatus,
    VisionJob,
    VisionTimings,
    WireError,
    encode_features,
    error_header,
)
from proto.dvd.v1 import admin_pb2_grpc
from vision_server import metrics
from vision_server.model import VisionEncoder
from vision_server.preprocess import ImageError, TilingParams, preprocess_image

log = logging.getLogger(__name__)
POLL_S = 0.1


class VisionServer:
    """Owns the encoder, the job socket, the feature sender and the health endpoint."""

    def __init__(self, config: DvDConfig, replica: int = 0) -> None:
        self.config = config
        self.replica = replica
        vc = config.vision
        self.server_id = f"vision-{replica}@{vc.host}:{vc.job_port + replica}"
        self.checkpoint = open_model(config.model.path, config.model.format)
        dtype = getattr(torch, vc.dtype)
        self.encoder, self.loaded_tensors = VisionEncoder.from_checkpoint(self.checkpoint, vc.device_of(replica), dtype)
        self.tokens_per_tile = self.checkpoint.tokens_per_tile
        self.jobs = PullChannel(f"tcp://{vc.host}:{vc.job_port + replica}")
        self.sender = create_backend(config.transport).sender()
        self._stop = threading.Event()
        self._grpc = self._start_grpc()

    def _start_grpc(self) -> grpc.Server:
        vc = self.config.vision
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        info = server_info(
            "vision", self.checkpoint, vc.dtype, vc.device_of(self.replica), self.loaded_tensors, [self.encoder]
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(info), server)
        health = add_health_and_reflection(server, ["dvd.v1.Admin"], aio=False)
        server.add_insecure_port(f"{vc.host}:{vc.grpc_port + self.replica}")
        server.start()
        health.set("", SERVING)
        return server

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        log.info("vision server ready", extra={"server_id": self.server_id, "jobs": self.jobs.address})
        try:
            while not self._stop.is_set():
                message = self.jobs.recv(POLL_S)
                if message is not None:
                    self._handle(message, time.time())
        finally:
            self._grpc.stop(grace=1.0)
            self.jobs.close()
            self.sender.close()

    def _handle(self, message: list[bytes], arrived: float) -> None:
        try:
            job = VisionJob.decode(message[0])
        except (WireError, IndexError) as exc:
            log.warning("dropped an undecodable job: %s", exc)
            metrics.JOBS.labels("undecodable").inc()
            return
        metrics.QUEUE_DEPTH.inc()
        try:
            header, features = self._encode(job, arrived)
            self._reply(job, header, features)
        finally:
            metrics.QUEUE_DEPTH.dec()

    def _encode(self, job: VisionJob, arrived: float) -> tuple[FeatureHeader, torch.Tensor | None]:
        start = time.time()
        limits = self.config.images
        try:
            if job.expired:
                return self._error(job, JobStatus.DEADLINE_EXCEEDED, "the job's deadline passed before it ran"), None
            if job.kind != "image":
                raise ImageError("this vision server accepts only still images")
            if job.max_tiles > limits.max_tiles:
                raise ImageError(f"max_tiles {job.max_tiles} exceeds the server limit {limits.max_tiles}")
            tiling = TilingParams(min_tiles=job.min_tiles, max_tiles=job.max_tiles, use_thumbnail=job.use_thumbnail)
            pixels = preprocess_image(job.data, tiling, limits)
            preprocessed = time.time()
            features = self.encoder(pixels)
            encoded = time.time()
        except ImageError as exc:
            return self._error(job, JobStatus.INVALID_INPUT, str(exc)), None
        except Exception:  # noqa: BLE001 - one bad job must not stop the server
            log.exception("vision job failed", extra={"job_id": job.job_id, "request_id": job.request_id})
            return self._error(job, JobStatus.INTERNAL, "the vision server failed on this input"), None
        tiles = features.shape[0]
        metrics.TILES.inc(tiles)
        metrics.BATCH_TILES.observe(tiles)
        metrics.QUEUE_MS.observe((start - arrived) * 1000)
        metrics.PREPROCESS_MS.observe((preprocessed - start) * 1000)
        metrics.ENCODE_MS.observe((encoded - preprocessed) * 1000)
        header = FeatureHeader(
            job_id=job.job_id,
            request_id=job.request_id,
            tile_tokens=(self.tokens_per_tile,) * tiles,
            timings=VisionTimings(
                queue_ms=(start - arrived) * 1000,
                preprocess_ms=(preprocessed - start) * 1000,
                compute_ms=(encoded - preprocessed) * 1000,
            ),
            server_id=self.server_id,
        )
        return header, features.reshape(-1, features.shape[-1])

    def _error(self, job: VisionJob, status: int, message: str) -> FeatureHeader:
        metrics.JOBS.labels(JobStatus.name(status)).inc()
        return error_header(job.job_id, job.request_id, status, message, self.server_id)

    def _reply(self, job: VisionJob, header: FeatureHeader, features: torch.Tensor | None) -> None:
        if header.ok:
            header = replace(header, timings=replace(header.timings, sent_unix_s=time.time()))
        frame, payload = encode_features(header, features)
        started = time.perf_counter()
        try:
            self.sender.send(job.reply_to, frame, payload)
        except TransportError as exc:
            log.warning("could not deliver features: %s", exc, extra={"job_id": job.job_id})
            metrics.JOBS.labels("undelivered").inc()
            return
        metrics.SEND_MS.observe((time.perf_counter() - started) * 1000)
        metrics.BYTES_SENT.inc(len(payload))
        if header.ok:
            metrics.JOBS.labels("ok").inc()
