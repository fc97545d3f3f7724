"""Feature-transfer benchmark: each transport against a raw loopback TCP socket, one run.

    .venv/bin/python -m benchmarks.transfer [--reps 10 --rounds 3 --backends raw,tcp,shm,nixl]

Every backend runs as two processes, like a vision and a language server: the receiver
asks for one payload at a time (ping-pong), the sender stamps the send start with the
monotonic clock, the receiver stamps delivery (recv returned a usable payload) and
"delivery + copy" (the payload also copied out once into a preallocated tensor, as the
language server does when it builds the prompt embeddings). Rounds interleave the
backends so background load hits all of them alike; the table shows medians over all
rounds and ratios within this run. Results also go to benchmarks/results/ as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO

import torch
import zmq

from benchmarks.report import write_json

STAMP = struct.Struct("<dQ")  # send start (perf_counter, CLOCK_MONOTONIC), payload bytes
WAIT_S = 60.0


@dataclass
class Variant:
    """One transport configuration under test."""

    label: str
    backend: str  # "raw" or a registered transport backend
    rdma_transports: str = ""
    deliver_s: list[float] = field(default_factory=list)
    copy_s: list[float] = field(default_factory=list)


def payload_tensor(nbytes: int) -> torch.Tensor:
    return torch.randn(nbytes // 2, generator=torch.Generator().manual_seed(nbytes)).to(torch.bfloat16)


# ---------------------------------------------------------------- receiver / sender processes


def run_receiver(backend: str, rdma_transports: str, commands: IO[str], out: IO[str]) -> None:
    """Print READY <transport address> <control address>, then answer `run <bytes> <reps>` lines."""
    control = zmq.Context.instance().socket(zmq.PUSH)
    control.setsockopt(zmq.LINGER, 0)
    control.setsockopt(zmq.SNDTIMEO, int(WAIT_S * 1000))
    control.bind("tcp://127.0.0.1:0")
    if backend == "raw":
        listener = socket.create_server(("127.0.0.1", 0))
        address = "raw://127.0.0.1:%d" % listener.getsockname()[1]
        receive = None
    else:
        from pipeline.config import TransportConfig
        from pipeline.transport import create_backend

        receiver = create_backend(TransportConfig(backend=backend, rdma_transports=rdma_transports)).receiver(
            "127.0.0.1", 0
        )
        address = receiver.address
    print("READY", address, control.getsockopt_string(zmq.LAST_ENDPOINT), file=out, flush=True)
    if backend == "raw":
        listener.settimeout(WAIT_S)
        conn, _ = listener.accept()
        conn.settimeout(WAIT_S)
        receive = _raw_receiver(conn)
    else:
        receive = _transport_receiver(receiver)
    for line in commands:
        words = line.split()
        if words[0] == "stop":
            break
        nbytes, reps = int(words[1]), int(words[2])
        target = torch.empty(nbytes // 2, dtype=torch.bfloat16)
        deliver, copy = [], []
        for _ in range(reps):
            control.send(STAMP.pack(0.0, nbytes))
            started, delivered, copied = receive(target)
            deliver.append(delivered - started)
            copy.append(copied - started)
        print(json.dumps({"deliver_s": deliver, "copy_s": copy}), file=out, flush=True)
    control.send(b"stop")


def _raw_receiver(conn: socket.socket):
    buffer = bytearray()

    def receive(target: torch.Tensor) -> tuple[float, float, float]:
        stamp = _recv_exactly(conn, memoryview(bytearray(STAMP.size)))
        started, nbytes = STAMP.unpack(stamp)
        if len(buffer) < nbytes:
            buffer.extend(bytes(nbytes - len(buffer)))
        _recv_exactly(conn, memoryview(buffer)[:nbytes])
        delivered = time.perf_counter()
        target.view(torch.uint8).copy_(torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes))
        return started, delivered, time.perf_counter()

    return receive


def _recv_exactly(conn: socket.socket, view: memoryview) -> memoryview:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("sender closed the raw socket")
        got += n
    return view


def _transport_receiver(receiver):
    def receive(target: torch.Tensor) -> tuple[float, float, float]:
        frame = receiver.recv(WAIT_S)
        if frame is None:
            raise TimeoutError("no payload within %g s" % WAIT_S)
        delivered = time.perf_counter()
        started, nbytes = STAMP.unpack(frame.header)
        if frame.payload.nbytes != nbytes:
            raise RuntimeError(f"payload is {frame.payload.nbytes} bytes, expected {nbytes}")
        target.view(torch.uint8).copy_(torch.frombuffer(frame.payload, dtype=torch.uint8))
        copied = time.perf_counter()
        frame.release()
        return started, delivered, copied

    return receive


def run_sender(backend: str, rdma_transports: str, address: str, control_address: str) -> None:
    control = zmq.Context.instance().socket(zmq.PULL)
    control.setsockopt(zmq.LINGER, 0)
    control.connect(control_address)
    payloads: dict[int, memoryview] = {}
    if backend == "raw":
        host, port = address.removeprefix("raw://").rsplit(":", 1)
        conn = socket.create_connection((host, int(port)), timeout=WAIT_S)
    else:
        from pipeline.config import TransportConfig
        from pipeline.transport import create_backend

        sender = create_backend(TransportConfig(backend=backend, rdma_transports=rdma_transports)).sender()
    while control.poll(int(WAIT_S * 1000)):
        message = control.recv()
        if message == b"stop":
            break
        nbytes = STAMP.unpack(message)[1]
        if nbytes not in payloads:
            payloads[nbytes] = payload_tensor(nbytes).view(torch.uint8).numpy().data
        payload = payloads[nbytes]
        started = time.perf_counter()
        if backend == "raw":
            conn.sendall(STAMP.pack(started, nbytes))
            conn.sendall(payload)
        else:
            sender.send(address, STAMP.pack(started, nbytes), payload)
    if backend != "raw":
        sender.close()


# ---------------------------------------------------------------- coordinator


class Pair:
    """A receiver process and a sender process for one variant."""

    def __init__(self, variant: Variant) -> None:
        me = [sys.executable, "-m", "benchmarks.transfer", "--backend", variant.backend]
        me += ["--rdma-transports", variant.rdma_transports]
        self.receiver = subprocess.Popen(
            [*me, "--role", "receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        ready = self._line("READY").split()
        if not ready:
            self.receiver.kill()
            raise RuntimeError(f"{variant.label}: the receiver did not start")
        self.sender = subprocess.Popen([*me, "--role", "sender", "--address", ready[1], "--control", ready[2]])

    def run(self, nbytes: int, reps: int) -> dict[str, list[float]]:
        self.receiver.stdin.write(f"run {nbytes} {reps}\n")
        self.receiver.stdin.flush()
        line = self._line("{")
        if not line:
            raise RuntimeError("the receiver exited")
        return json.loads(line)

    def _line(self, prefix: str) -> str:
        """The receiver's next line starting with prefix (libraries may print to stdout too); "" at exit."""
        for line in self.receiver.stdout:
            if line.startswith(prefix):
                return line
        return ""

    def stop(self) -> None:
        if self.receiver.poll() is None:
            self.receiver.stdin.write("stop\n")
            self.receiver.stdin.flush()
        for process in (self.receiver, self.sender):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except ImportError:
        return False
    return True


def variants(backends: list[str], nixl_transports: list[str]) -> list[Variant]:
    out = []
    for backend in backends:
        if backend != "nixl":
            out.append(Variant(backend, backend))
        elif not nixl_available():
            print("nixl: not installed (pip install -e '.[rdma]'), skipped", file=sys.stderr)
        else:
            for tls in nixl_transports:
                out.append(Variant(f"nixl (UCX_TLS={tls or 'auto'})", "nixl", tls))
    return out


def summarize(variant: Variant, nbytes: int, raw: Variant | None, tcp: Variant | None) -> dict:
    deliver = statistics.median(variant.deliver_s)
    copy = statistics.median(variant.copy_s)
    row = {
        "transport": variant.label,
        "payload_bytes": nbytes,
        "samples": len(variant.deliver_s),
        "deliver_ms": deliver * 1000,
        "deliver_copy_ms": copy * 1000,
        "deliver_gb_s": nbytes / deliver / 1e9,
        "deliver_copy_gb_s": nbytes / copy / 1e9,
    }
    if raw is not None:
        row["vs_raw"] = statistics.median(raw.deliver_s) / deliver
        row["vs_raw_with_copy"] = statistics.median(raw.copy_s) / copy
    if tcp is not None:
        row["vs_tcp"] = statistics.median(tcp.deliver_s) / deliver
        row["vs_tcp_with_copy"] = statistics.median(tcp.copy_s) / copy
    return row


def print_table(rows: list[dict]) -> None:
    head = ("transport", "deliver ms", "GB/s", "vs raw", "vs tcp", "+copy ms", "GB/s", "vs raw", "vs tcp")
    print("%-26s %10s %6s %7s %7s %10s %6s %7s %7s" % head)
    for r in rows:
        print(
            "%-26s %10.2f %6.2f %7.2f %7.2f %10.2f %6.2f %7.2f %7.2f"
            % (
                r["transport"], r["deliver_ms"], r["deliver_gb_s"], r.get("vs_raw", float("nan")),
                r.get("vs_tcp", float("nan")), r["deliver_copy_ms"], r["deliver_copy_gb_s"],
                r.get("vs_raw_with_copy", float("nan")), r.get("vs_tcp_with_copy", float("nan")),
            )
        )


def coordinate(args: argparse.Namespace) -> None:
    nbytes = args.tiles * args.rows_per_tile * args.hidden * 2
    chosen = variants(args.backends.split(","), args.nixl_transports.split(","))
    pairs = [Pair(v) for v in chosen]
    try:
        for pair in pairs:
            pair.run(nbytes, args.warmup)
        for _ in range(args.rounds):
            for variant, pair in zip(chosen, pairs):
                result = pair.run(nbytes, args.reps)
                variant.deliver_s += result["deliver_s"]
                variant.copy_s += result["copy_s"]
    finally:
        for pair in pairs:
            pair.stop()
    by_label = {v.label: v for v in chosen}
    rows = [summarize(v, nbytes, by_label.get("raw"), by_label.get("tcp")) for v in chosen]
    print(f"payload: {args.tiles} tiles x {args.rows_per_tile} x {args.hidden} bf16 = {nbytes / 1e6:.1f} MB; "
          f"{args.rounds} rounds x {args.reps} reps (median); {os.cpu_count()} CPUs")
    print_table(rows)
    path = write_json("transfer", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="raw,tcp,shm,nixl")
    parser.add_argument("--nixl-transports", default=",tcp", help="UCX_TLS values to try; empty = UCX picks")
    parser.add_argument("--tiles", type=int, default=13)
    parser.add_argument("--rows-per-tile", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--role", choices=["coordinator", "receiver", "sender"], default="coordinator")
    parser.add_argument("--backend", default="")
    parser.add_argument("--rdma-transports", default="")
    parser.add_argument("--address", default="")
    parser.add_argument("--control", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role == "receiver":
        run_receiver(args.backend, args.rdma_transports, sys.stdin, sys.stdout)
    elif args.role == "sender":
        run_sender(args.backend, args.rdma_transports, args.address, args.control)
    else:
        coordinate(args)


if __name__ == "__main__":
    main()
