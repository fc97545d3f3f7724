"""Chaos through the launcher (`dvd serve`): a vision server killed with -9 under a steady mix of
text and image requests costs only its in-flight jobs. Text requests go on succeeding, image
requests in flight end within seconds (UNAVAILABLE, or answered by the other replica), the
launcher starts the server again and image requests succeed after it, no KV block stays held,
and Ctrl-C leaves no shared-memory segment behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import pytest

from pipeline.client import DvDClient, image, message, sampling
from pipeline.transport.shm_segments import PREFIX, SHM_DIR
from tests.conftest import photo_bytes, port_overrides
from tests.e2e.metrics import scrape
from tests.e2e.test_launch import _launched, _lines, _pid_of, _read_until
from tests.waiting import wait_until

IN_FLIGHT_BOUND_S = 3.0
PHOTOS = ("coffee", "chelsea", "rocket", "astronaut")
PARAMS = dict(max_new_tokens=4)


@dataclass
class Record:
    kind: str
    started: float
    ended: float = 0.0
    code: grpc.StatusCode | None = None


def _load(address: str, kind: str, records: list[Record], stop: threading.Event) -> None:
    """Closed-loop requests of one kind until `stop`."""
    with DvDClient(address, timeout_s=60) as client:
        index = 0
        while not stop.is_set():
            index += 1
            if kind == "text":
                parts = [f"Say something about the number {index}."]
            else:
                parts = [image(photo_bytes(PHOTOS[index % len(PHOTOS)])), "What is this?"]
            record = Record(kind, time.monotonic())
            records.append(record)
            try:
                client.generate([message("user", *parts)], sampling(**PARAMS))
                record.code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                record.code = exc.code()
            record.ended = time.monotonic()


def _kv_blocks_used(overrides: dict) -> float:
    return scrape("127.0.0.1", overrides["language.metrics_port"], "dvd_kv_cache_used_blocks")


def _segments() -> set[str]:
    return {path.name for path in SHM_DIR.glob(f"{PREFIX}*")}


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_killed_vision_server_costs_only_its_jobs_and_is_started_again(replicas):
    overrides = {**port_overrides(replicas), "vision.replicas": replicas, "transport.backend": "shm",
                 "vision.feature_cache_bytes": 0, "language.vision_timeout_s": 60.0}
    segments_before = _segments()
    with _launched(overrides) as launcher:
        lines = _lines(launcher.stdout)
        _read_until(lines, "Ctrl-C stops both servers")
        address = f"127.0.0.1:{overrides['language.grpc_port']}"
        records: list[Record] = []
        stop = threading.Event()
        loaders = [threading.Thread(target=_load, args=(address, kind, records, stop), daemon=True)
                   for kind in ("text", "image", "image")]
        for loader in loaders:
            loader.start()
        try:
            assert wait_until(lambda: sum(r.kind == "image" and r.code == grpc.StatusCode.OK for r in records) >= 3,
                              timeout_s=120)
            os.kill(_pid_of(f"127.0.0.1:{overrides['vision.grpc_port']}"), signal.SIGKILL)
            killed = time.monotonic()
            said = _read_until(lines, "vision-0 is serving again")
            restarted = time.monotonic()
            assert any("vision-0 exited (killed by SIGKILL)" in line for line in said)
            assert wait_until(lambda: any(r.kind == "image" and r.started > restarted and r.code == grpc.StatusCode.OK
                                          for r in records), timeout_s=60)
        finally:
            stop.set()
            for loader in loaders:
                loader.join(90)
        in_flight = [r for r in records if r.kind == "image" and r.started < killed < r.ended]
        outage = [r for r in records if killed <= r.started <= restarted]
        after = [r for r in records if r.started > restarted]
        assert in_flight, "no image request was in flight at the kill"
        assert all(r.ended - killed < IN_FLIGHT_BOUND_S for r in in_flight)
        allowed = {grpc.StatusCode.OK} if replicas > 1 else {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert {r.code for r in in_flight} <= allowed
        outage_text = [r for r in outage if r.kind == "text"]
        assert outage_text and all(r.code == grpc.StatusCode.OK for r in outage_text)
        assert {r.code for r in outage if r.kind == "image"} <= allowed
        assert after and all(r.code == grpc.StatusCode.OK for r in after)
        assert wait_until(lambda: _kv_blocks_used(overrides) == 0, timeout_s=30)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0
    assert not _segments() - segments_before
    outage_images = [r for r in outage if r.kind == "image"]
    print(f"\nchaos, {replicas} replica(s): in flight at the kill {len(in_flight)} image requests, "
          f"ended within {max(r.ended - killed for r in in_flight):.2f} s "
          f"({sum(r.code == grpc.StatusCode.OK for r in in_flight)} OK); during the {restarted - killed:.1f} s "
          f"until the restart: text {sum(r.code == grpc.StatusCode.OK for r in outage_text)}/{len(outage_text)} OK, "
          f"images {sum(r.code == grpc.StatusCode.OK for r in outage_images)}/{len(outage_images)} OK; "
          f"after: {len(after)} requests, all OK")
