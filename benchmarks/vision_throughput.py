"""Vision-server throughput with cross-request batching off and on; optionally ViR's savings.

    python -m benchmarks.vision_throughput [--jobs 64] [--concurrency 8] [--dtype float32] [--vir]

Throughput: two real vision server processes run on the tiny model, one with
`max_batch_tiles: 1` (batching off: one tile per ViT forward) and one with the configured
batching (`max_batch_tiles: 64`, `max_wait_ms: 5`), measured in alternation over `--repeats`
rounds (median and range). A closed-loop client keeps
`--concurrency` image jobs in flight (photos at 448, 896 and 1344 px: 1, 5 and 10 tiles) and
counts tiles answered per second, decoding and tiling included; the feature cache is off.

--vir: two full deployments of the tiny Flash checkpoint answer the same requests with
`vision.vir_mode: all_256` and `router`; reported are the feature bytes the vision server
sent and the LLM prompt tokens, and their reductions.

Prints tables and writes JSON to benchmarks/results/. On a shared machine compare the ratios
measured within one run, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.report import markdown_table, write_json
from benchmarks.server_cpu import scrape
from benchmarks.workloads import PHOTOS, SIZES, photo
from pipeline.wire.channels import PushChannel
from pipeline.config import TransportConfig
from pipeline.entrypoints.launch import Deployment, ServerProcess
from pipeline.transport import create_backend
from pipeline.wire import VisionJob, decode_header

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
TIMEOUT_S = 300.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def images() -> list[bytes]:
    return [photo(name, side) for side in SIZES.values() for name in PHOTOS]


# ----- throughput -----------------------------------------------------------------------------
def start_vision(overrides: dict[str, Any], log_dir: Path) -> tuple[ServerProcess, int, int]:
    job_port, grpc_port, metrics_port = free_ports(3)
    settings = {"vision.job_port": job_port, "vision.grpc_port": grpc_port, "vision.metrics_port": metrics_port}
    argv = [sys.executable, "-m", "vision_server", "--config", str(CONFIG)]
    argv += [f"--set={k}={v}" for k, v in {**settings, **overrides}.items()]
    server = ServerProcess("vision", argv, f"127.0.0.1:{grpc_port}", log_path=log_dir / f"vision-{job_port}.log")
    server.start(env=None)
    server.wait_ready(180)
    return server, job_port, metrics_port


def drive(job_port: int, data: list[bytes], jobs: int, concurrency: int) -> tuple[int, float]:
    """Keep `concurrency` jobs in flight until `jobs` are answered; returns (tiles, seconds)."""
    push = PushChannel(f"tcp://127.0.0.1:{job_port}")
    receiver = create_backend(TransportConfig()).receiver("127.0.0.1", free_ports(1)[0])
    try:
        sent = answered = tiles = 0
        started = time.perf_counter()

        def send() -> None:
            nonlocal sent
            job = VisionJob(uuid.uuid4().hex, "bench", "image", data[sent % len(data)], receiver.address)
            if not push.send([job.encode()]):
                raise RuntimeError("the vision server did not take a job")
            sent += 1

        for _ in range(min(concurrency, jobs)):
            send()
        deadline = time.monotonic() + TIMEOUT_S
        while answered < jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{jobs - answered} jobs unanswered after {TIMEOUT_S:g} s")
            frame = receiver.recv(1.0)
            if frame is None:
                continue
            header = decode_header(frame.header)
            frame.release()
            if not header.ok:
                raise RuntimeError(f"job failed: {header.error_message}")
            answered += 1
            tiles += len(header.tile_tokens)
            if sent < jobs:
                send()
        return tiles, time.perf_counter() - started
    finally:
        push.close()
        receiver.close()


MODES = (("off (ViT forwards of 1 tile)", {"vision.max_batch_tiles": 1}),
         ("on (max_batch_tiles 64, max_wait_ms 5)", {"vision.max_batch_tiles": 64}))


def throughput(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Both modes' servers run side by side (only one is driven at a time); the modes alternate
    over `--repeats` rounds, so that a slow spell of a shared machine falls on both."""
    data = images()
    common = {"vision.dtype": args.dtype, "vision.feature_cache_bytes": 0, "vision.threads": args.threads}
    servers: list[tuple[ServerProcess, int, int]] = []
    measured: list[list[dict[str, float]]] = [[] for _ in MODES]
    try:
        for _, batching in MODES:
            servers.append(start_vision({**common, **batching}, log_dir))
        for _, job_port, _ in servers:
            drive(job_port, data, min(8, args.jobs), args.concurrency)  # warm-up
        for _ in range(args.repeats):
            for runs, (_, job_port, metrics_port) in zip(measured, servers):
                before = scrape("127.0.0.1", metrics_port)
                tiles, seconds = drive(job_port, data, args.jobs, args.concurrency)
                after = scrape("127.0.0.1", metrics_port)
                runs.append({"tiles": tiles, "seconds": seconds,
                             "batches": after["dvd_vision_batch_tiles_count"] - before["dvd_vision_batch_tiles_count"],
                             "batch_tiles": after["dvd_vision_batch_tiles_sum"] - before["dvd_vision_batch_tiles_sum"]})
    finally:
        for server, _, _ in servers:
            server.stop(15)
    rows = []
    for (label, _), runs in zip(MODES, measured):
        rates = [run["tiles"] / run["seconds"] for run in runs]
        batches = sum(run["batches"] for run in runs)
        rows.append({
            "batching": label, "jobs": args.jobs, "repeats": len(runs), "tiles_per_s": statistics.median(rates),
            "tiles_per_s_min": min(rates), "tiles_per_s_max": max(rates),
            "tiles_per_batch": sum(run["batch_tiles"] for run in runs) / batches if batches else float("nan"),
        })
    off, on = measured
    rows[1]["speedup"] = statistics.median(
        (b["tiles"] / b["seconds"]) / (a["tiles"] / a["seconds"]) for a, b in zip(off, on)
    )  # the median of each round's on/off ratio
    return rows


# ----- ViR ------------------------------------------------------------------------------------
def vir_savings(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    from pipeline.client import DvDClient, image, message, sampling
    from pipeline.model.tiny_model import tiny_model_dir
    from proto.dvd.v1 import generate_pb2 as pb

    data = [photo(name, side) for side in (SIZES["896px"], SIZES["1344px"]) for name in PHOTOS]
    rows = []
    for mode in ("all_256", "router"):
        ports = free_ports(6)
        overrides = {
            "model.path": str(tiny_model_dir("flash")), "vision.vir_mode": mode, "vision.dtype": args.dtype,
            "language.dtype": args.dtype, "vision.feature_cache_bytes": 0,
            "vision.job_port": ports[0], "vision.grpc_port": ports[1], "vision.metrics_port": ports[2],
            "language.grpc_port": ports[3], "language.feature_port": ports[4], "language.metrics_port": ports[5],
        }
        with Deployment(CONFIG, overrides, log_dir=log_dir / f"vir-{mode}") as deployment:
            before = scrape("127.0.0.1", ports[2])
            with DvDClient(deployment.address, timeout_s=TIMEOUT_S) as client:
                futures = [
                    client.stub.GenerateUnary.future(
                        pb.GenerateRequest(messages=[message("user", image(d), "Describe it.")],
                                           sampling=sampling(max_new_tokens=1)),
                        timeout=TIMEOUT_S,
                    )
                    for d in data
                ]
                results = [f.result() for f in futures]
            after = scrape("127.0.0.1", ports[2])
        compressed = after.get('dvd_vision_vir_tiles_total{tokens="64"}', 0.0) - before.get(
            'dvd_vision_vir_tiles_total{tokens="64"}', 0.0)
        tiles = sum(r.usage.image_tiles for r in results)
        rows.append({
            "vir_mode": mode, "requests": len(results), "tiles": tiles, "compressed_tiles": int(compressed),
            "feature_bytes": after["dvd_vision_bytes_sent_total"] - before.get("dvd_vision_bytes_sent_total", 0.0),
            "prompt_tokens": sum(r.usage.prompt_tokens for r in results),
            "image_tokens": sum(r.usage.image_tokens for r in results),
        })
    full, routed = rows
    routed["bytes_reduction"] = 1 - routed["feature_bytes"] / full["feature_bytes"]
    routed["prompt_token_reduction"] = 1 - routed["prompt_tokens"] / full["prompt_tokens"]
    routed["compressed_fraction"] = routed["compressed_tiles"] / routed["tiles"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vision_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=64, help="image jobs per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="jobs in flight")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both modes, alternated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="vision.threads (0 = torch's default)")
    parser.add_argument("--vir", action="store_true", help="also measure ViR's byte and prompt-token savings")
    args = parser.parse_args(argv)
    payload: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="dvd-bench-") as tmp:
        log_dir = Path(tmp)
        rows = throughput(args, log_dir)
        payload["throughput"] = rows
        print(f"\nVision throughput, {args.concurrency} concurrent image jobs ({args.dtype}):\n")
        print(markdown_table(rows, [("batching", "batching"), ("jobs", "jobs"), ("repeats", "rounds"),
                                    ("tiles_per_s", "tiles/s (median)"), ("tiles_per_s_min", "min"),
                                    ("tiles_per_s_max", "max"), ("tiles_per_batch", "tiles/batch"),
                                    ("speedup", "on/off (median of rounds)")]))
        if args.vir:
            vir_rows = vir_savings(args, log_dir)
            payload["vir"] = vir_rows
            print("\nViR on the tiny Flash checkpoint (same requests, all_256 vs router):\n")
            print(markdown_table(vir_rows, [("vir_mode", "vir_mode"), ("tiles", "tiles"),
                                            ("compressed_tiles", "compressed"), ("feature_bytes", "bytes sent"),
                                            ("prompt_tokens", "prompt tokens"), ("bytes_reduction", "bytes -"),
                                            ("prompt_token_reduction", "prompt tokens -")]))
    path = write_json("vision_throughput", payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
