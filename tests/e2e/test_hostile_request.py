"""One hostile request (two 31 MB PNGs padded with 2.6 million empty chunks before their pixels)
does not stall the language server: other clients' token streams and its health checks go on
within a bound while it is read and refused."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from pipeline.client import image, message, sampling
from tests.waiting import wait_until

GAP_BOUND_S = 1.5  # the longest pause allowed in another client's token stream, or a health answer
PADDING_CHUNKS = 2_600_000
STREAM_TOKENS = 200


def _padded_png(chunks: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(buffer, "PNG")
    data = buffer.getvalue()
    first_data = data.index(b"IDAT") - 4
    empty = struct.pack(">I", 0) + b"teXz" + struct.pack(">I", zlib.crc32(b"teXz"))  # an unknown ancillary chunk
    return data[:first_data] + empty * chunks + data[first_data:]


def _stream(client, arrivals: list[list[float]], stop: threading.Event) -> None:
    """Streams one request after another until `stop`; the arrival time of each stream's events."""
    while not stop.is_set():
        times: list[float] = []
        arrivals.append(times)
        for _ in client.stream([message("user", "Tell me a long story.")],
                               sampling(max_new_tokens=STREAM_TOKENS, ignore_eos=True)):
            times.append(time.monotonic())


def _watch_health(address: str, answers: list[float], stop: threading.Event) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                answers.append(time.monotonic() - started if reply.status == reply.SERVING else float("inf"))
            except grpc.RpcError:
                answers.append(float("inf"))
            stop.wait(0.05)


def test_a_hostile_request_does_not_stall_other_clients_or_health(fp32_deployment, client_for):
    hostile = _padded_png(PADDING_CHUNKS)
    assert len(hostile) > 30_000_000
    streamer, attacker = client_for(fp32_deployment), client_for(fp32_deployment)
    arrivals: list[list[float]] = []
    health: list[float] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_stream, args=(streamer, arrivals, stop), daemon=True),
               threading.Thread(target=_watch_health, args=(fp32_deployment.address, health, stop), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: arrivals and len(arrivals[0]) >= 5, timeout_s=60)  # streaming is under way
        started = time.monotonic()
        try:
            attacker.generate([message("user", image(hostile), image(hostile), "What is this?")], sampling(max_new_tokens=4))
            outcome = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome, details = exc.code(), exc.details()
        finished = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert all(len(times) == STREAM_TOKENS + 1 for times in arrivals[:-1])  # every delta, then the result
    meanwhile = [t for times in arrivals for t in times if started <= t <= finished]
    assert len(meanwhile) >= 10, "the other client streamed nothing while the hostile request was handled"
    gaps = [later - earlier for times in arrivals for earlier, later in zip(times, times[1:])]
    assert max(gaps) < GAP_BOUND_S, f"a token came {max(gaps):.2f} s after the previous one"
    assert health and max(health) < GAP_BOUND_S, f"a health check took {max(health):.2f} s"
    assert outcome == grpc.StatusCode.INVALID_ARGUMENT and "chunks before its image data" in details
    print(f"\nhostile request refused in {finished - started:.2f} s ({len(meanwhile)} tokens streamed meanwhile); the other stream's longest token gap {max(gaps) * 1000:.0f} ms, "
          f"longest health answer {max(health) * 1000:.0f} ms")
