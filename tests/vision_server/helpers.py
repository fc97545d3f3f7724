"""Test helpers for the vision side: a job client that talks to a real vision server, an MP4 writer,
a stand-alone vision server process, and image and video decoding as the vision server does it."""

from __future__ import annotations

import io
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import ImageLimits, TransportConfig, VideoLimits
from pipeline.wire.channels import PushChannel
from pipeline.entrypoints.launch import LaunchError, ServerProcess
from pipeline.transport import create_backend
from pipeline.wire import FeatureHeader, VisionJob, decode_features, decode_header
from tests.conftest import TINY_CONFIG, free_ports
from vision_server.preprocess import TilingParams, decode_image, tile_image, to_pixel_values
from vision_server.video import VideoSampling, iter_video_frames


class JobClient:
    """Sends VisionJobs to one vision server and collects the answers sent to its own receiver."""

    def __init__(self, job_endpoint: str, hidden_size: int = 64) -> None:
        self.channel = PushChannel(f"tcp://{job_endpoint}")
        (port,) = free_ports(1)
        self.receiver = create_backend(TransportConfig()).receiver("127.0.0.1", port)
        self.hidden_size = hidden_size

    def job(self, data: bytes, kind: str = "image", **fields: Any) -> VisionJob:
        job = VisionJob(job_id=uuid.uuid4().hex, request_id="test", kind=kind, data=data, reply_to="", **fields)
        return replace(job, reply_to=self.receiver.address)

    def send(self, *jobs: VisionJob) -> None:
        for job in jobs:
            assert self.channel.send([job.encode()]), "the vision server did not take the job"

    def collect(self, jobs: list[VisionJob], timeout_s: float = 60.0) -> dict[str, tuple[FeatureHeader, Any]]:
        """Wait for one answer per job: job_id -> (header, rows tensor or None)."""
        wanted = {job.job_id for job in jobs}
        answers: dict[str, tuple[FeatureHeader, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while wanted - set(answers):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no answer for {len(wanted - set(answers))} job(s) within {timeout_s} s"
            frame = self.receiver.recv(min(remaining, 1.0))
            if frame is None:
                continue
            header = decode_header(frame.header)
            features = decode_features(header, frame.payload, keepalive=frame, hidden_size=self.hidden_size)
            rows = None if features.tensor is None else features.tensor.clone()
            features.release()
            answers[header.job_id] = (header, rows)
        return answers

    def run(self, *jobs: VisionJob, timeout_s: float = 60.0) -> list[tuple[FeatureHeader, Any]]:
        self.send(*jobs)
        answers = self.collect(list(jobs), timeout_s)
        return [answers[job.job_id] for job in jobs]

    def close(self) -> None:
        self.channel.close()
        self.receiver.close()


def start_vision_server(overrides: dict[str, Any], log_dir: Path) -> tuple[ServerProcess, dict[str, Any]]:
    """A stand-alone vision server process from configs/tiny.yaml on free ports; returns it and its settings."""
    job_port, grpc_port, metrics_port = free_ports(3)
    settings = {"vision.job_port": job_port, "vision.grpc_port": grpc_port, "vision.metrics_port": metrics_port}
    settings.update(overrides)
    argv = [sys.executable, "-m", "vision_server", "--config", str(TINY_CONFIG)]
    argv += [f"--set={key}={value}" for key, value in settings.items()]
    server = ServerProcess("vision", argv, f"127.0.0.1:{grpc_port}", log_path=log_dir / "vision.log")
    server.start(env=None)
    try:
        server.wait_ready(120)
    except LaunchError:
        server.stop(10)
        raise
    return server, settings


def moving_frames(count: int, width: int = 320, height: int = 240) -> list[np.ndarray]:
    """RGB frames of a photo scrolling sideways, with a frame counter block in a corner."""
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((width, height)))
    frames = []
    for i in range(count):
        frame = np.roll(base, i * 7, axis=1).copy()
        frame[:24, :24] = (i * 9) % 256
        frames.append(frame)
    return frames


def mp4_bytes(frames: list[np.ndarray], fps: int = 24, pix_fmt: str = "yuv420p") -> bytes:
    """Encode RGB frames as an H.264 MP4 in memory with PyAV."""
    import av

    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def pyav_frames(data: bytes) -> list[np.ndarray]:
    """Every frame of a video decoded with PyAV, as RGB arrays (an independent decoder)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def preprocess_image(data: bytes, params: TilingParams, limits: ImageLimits) -> torch.Tensor:
    """Encoded image bytes -> pixel values [T, 3, tile_size, tile_size], as the vision server makes them."""
    return to_pixel_values(tile_image(decode_image(data, limits), params), params.tile_size)


def decode_video_frames(
    data: bytes, sampling: VideoSampling, video_limits: VideoLimits, image_limits: ImageLimits
) -> list[Image.Image]:
    """The sampled frames of a video, decoded under the given limits (ImageError says why not)."""
    return list(iter_video_frames(data, sampling, video_limits, image_limits))
