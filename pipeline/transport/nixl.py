"""RDMA-capable transport through NVIDIA NIXL (optional extra "rdma"): the receiver reads.

Sender: copies the payload into a registered buffer (nixl_pool.py) and sends, over the
TCP backend's ZMQ socket, the header plus a descriptor: where the buffer is, how long the
payload is, a transfer id, and the sender agent's metadata (a few hundred bytes: its
connection info and the keys of its registered buffers, so a receiver needs no other
rendezvous, and re-adds the sender whenever the metadata changed). The buffer is handed out again when the receiver's
read-completion notification comes back, or retired (deregistered, never reused) after
`payload_timeout_s` without one.

Receiver: on each descriptor, takes a registered buffer, issues a one-sided READ from
the sender's buffer into it (RDMA on InfiniBand / RoCE; shared memory or TCP through UCX
when there is no RDMA device), and returns a view of that buffer; releasing the frame
hands the buffer back to its pool.

UCX picks its transports itself; `rdma_transports` and `rdma_devices` set UCX_TLS and
UCX_NET_DEVICES for this process before the first agent is created.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import threading
import time
import uuid
import weakref
from typing import Callable

import numpy as np
from nixl._api import nixl_agent, nixl_agent_config

from pipeline.config import TransportConfig
from pipeline.transport import base
from pipeline.transport.base import FeatureReceiver, FeatureSender, ReceivedFrame, TransportBackend, TransportError
from pipeline.transport.nixl_pool import RegisteredBuffer, RegisteredPool
from pipeline.transport.tcp import TcpBackend, TcpReceiver, TcpSender

log = logging.getLogger(__name__)
DESCRIPTOR_MAGIC = b"DVDNIXL1"
_FIXED = struct.Struct("<8sQQQH")  # magic, address, nbytes, transfer id, agent-name length
_NOTIF = struct.Struct("<Q")  # transfer id, sent back to the sender when the read completed


def encode_descriptor(address: int, nbytes: int, transfer_id: int, agent_name: str, metadata: bytes) -> bytes:
    name = agent_name.encode()
    return _FIXED.pack(DESCRIPTOR_MAGIC, address, nbytes, transfer_id, len(name)) + name + metadata


def parse_descriptor(data: bytes) -> tuple[int, int, int, str, bytes]:
    """(address, nbytes, transfer id, agent name, agent metadata); ValueError if malformed."""
    if len(data) < _FIXED.size:
        raise ValueError("descriptor too short")
    magic, address, nbytes, transfer_id, name_len = _FIXED.unpack_from(data)
    if magic != DESCRIPTOR_MAGIC or len(data) < _FIXED.size + name_len:
        raise ValueError(f"not a nixl descriptor: {data[:16]!r}")
    name = data[_FIXED.size : _FIXED.size + name_len].decode()
    return address, nbytes, transfer_id, name, data[_FIXED.size + name_len :]


def make_agent(config: TransportConfig, role: str) -> nixl_agent:
    """A NIXL agent with the configured plugin; UCX settings go to the environment first."""
    if config.rdma_transports:
        os.environ["UCX_TLS"] = config.rdma_transports
    if config.rdma_devices:
        os.environ["UCX_NET_DEVICES"] = config.rdma_devices
    name = f"dvd-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    agent = nixl_agent(name, nixl_agent_config(backends=[config.rdma_plugin]))
    if config.rdma_plugin not in agent.backends:
        raise TransportError(f"NIXL plugin {config.rdma_plugin!r} is not available (have: {agent.plugin_list})")
    return agent


class NixlSender(FeatureSender):
    def __init__(self, config: TransportConfig, control: TcpSender) -> None:
        self._control = control
        self._timeout_s = config.payload_timeout_s
        self._agent = make_agent(config, "vision")
        self._pool = RegisteredPool(self._agent, config.pool_idle_s)
        self._metadata = self._agent.get_agent_metadata()
        self._metadata_version = self._pool.version
        self._pending: dict[int, tuple[RegisteredBuffer, float]] = {}
        self._ids = itertools.count(1)

    @property
    def pending(self) -> int:
        """Payloads sent whose read has not completed (and not timed out) yet."""
        return len(self._pending)

    @property
    def pooled_buffers(self) -> int:
        return self._pool.size

    def send(self, address: str, header: bytes, payload: memoryview | bytes) -> None:
        data = memoryview(payload).cast("B")
        self.reap()
        if data.nbytes == 0:
            self._control.send(address, header, b"")
            return
        try:
            buffer = self._pool.take(data.nbytes)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            raise TransportError(f"cannot register {data.nbytes} bytes with NIXL: {exc}") from exc
        if self._metadata_version != self._pool.version:
            self._metadata = self._agent.get_agent_metadata()
            self._metadata_version = self._pool.version
        buffer.array[: data.nbytes] = np.frombuffer(data, dtype=np.uint8)
        transfer_id = next(self._ids)
        self._pending[transfer_id] = (buffer, time.monotonic())
        descriptor = encode_descriptor(buffer.address, data.nbytes, transfer_id, self._agent.name, self._metadata)
        try:
            self._control.send(address, header, descriptor)
        except TransportError:
            del self._pending[transfer_id]
            self._pool.give_back(buffer)
            raise

    def reap(self) -> None:
        """Hand back buffers whose read completed; retire timed-out ones; free idle ones."""
        for messages in self._agent.get_new_notifs().values():
            for message in messages:
                if len(message) != _NOTIF.size:
                    continue
                done = self._pending.pop(_NOTIF.unpack(message)[0], None)
                if done is not None:
                    self._pool.give_back(done[0])
        now = time.monotonic()
        for transfer_id, (buffer, sent_at) in list(self._pending.items()):
            if now - sent_at > self._timeout_s:
                log.warning("reclaimed a payload the receiver never read", extra={"transfer_id": transfer_id})
                del self._pending[transfer_id]
                self._pool.retire(buffer)
        self._pool.trim()

    def close(self) -> None:
        self._control.close()
        self._pending.clear()
        self._pool.close()


class NixlReceiver(FeatureReceiver):
    def __init__(
        self, config: TransportConfig, control: TcpReceiver, max_payload_bytes: int = base.DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        self._control = control
        self._max_payload_bytes = max_payload_bytes
        self._read_timeout_s = config.send_timeout_s
        self._agent = make_agent(config, "language")
        self._pool = RegisteredPool(self._agent, config.pool_idle_s)
        self._remotes: dict[str, bytes] = {}  # agent name -> the metadata last added for it

    @property
    def address(self) -> str:
        return self._control.address

    @property
    def pooled_buffers(self) -> int:
        return self._pool.size

    def recv(self, timeout_s: float) -> ReceivedFrame | None:
        self._pool.trim()
        frame = self._control.recv(timeout_s)
        if frame is None:
            return None
        descriptor = bytes(frame.payload)
        frame.release()
        if not descriptor:
            return ReceivedFrame(header=frame.header, payload=memoryview(b""))
        try:
            return self._read(frame.header, *parse_descriptor(descriptor))
        except Exception as exc:  # noqa: BLE001 - a bad descriptor or a failed read must not stop receiving
            # An empty payload fails validation, so the request fails with this frame's header.
            log.warning("cannot read a nixl payload: %s", exc)
            return ReceivedFrame(header=frame.header, payload=memoryview(b""))

    def _read(
        self, header: bytes, address: int, nbytes: int, transfer_id: int, agent_name: str, metadata: bytes
    ) -> ReceivedFrame:
        if not 0 < nbytes <= self._max_payload_bytes:
            raise ValueError(f"descriptor announces {nbytes} bytes (at most {self._max_payload_bytes} are taken)")
        if self._remotes.get(agent_name) != metadata:
            added = self._agent.add_remote_agent(metadata)
            if (added.decode() if isinstance(added, bytes) else added) != agent_name:
                raise ValueError(f"descriptor metadata does not describe agent {agent_name}")
            self._remotes[agent_name] = metadata
        buffer = self._pool.take(nbytes)
        try:
            self._transfer(buffer, address, nbytes, transfer_id, agent_name)
        except BaseException:
            self._pool.retire(buffer)
            raise
        view = buffer.array[:nbytes]
        release = _once(self._pool.give_back, buffer)
        weakref.finalize(view, release)  # a frame dropped without release() still frees its buffer
        return ReceivedFrame(header=header, payload=memoryview(view), keepalive=view, on_release=release)

    def _transfer(self, buffer: RegisteredBuffer, address: int, nbytes: int, transfer_id: int, agent: str) -> None:
        local = self._agent.get_xfer_descs([(buffer.address, nbytes, 0)], "DRAM")
        remote = self._agent.get_xfer_descs([(address, nbytes, 0)], "DRAM")
        handle = self._agent.initialize_xfer("READ", local, remote, agent, _NOTIF.pack(transfer_id))
        state = None
        try:
            state = self._agent.transfer(handle)
            deadline = time.monotonic() + self._read_timeout_s
            spins = 0
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransportError(f"read from {agent} did not finish within {self._read_timeout_s:g} s")
                spins += 1
                if spins > 1000:  # long transfers: poll less often, leave the CPU to the progress thread
                    time.sleep(0.0002)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransportError(f"read from {agent} failed ({state})")
        finally:
            try:
                self._agent.release_xfer_handle(handle)
            except Exception as exc:  # noqa: BLE001 - a transfer still in flight cannot always be released
                log.warning("cannot release a nixl transfer: %s", exc)
                if state != "DONE":
                    self._pool.strand(buffer)  # the read may still write into it: never reuse or free it

    def close(self) -> None:
        self._control.close()
        self._pool.close()
        for agent in self._remotes:
            self._agent.remove_remote_agent(agent)
        self._remotes.clear()


def _once(function: Callable[[RegisteredBuffer], None], buffer: RegisteredBuffer) -> Callable[[], None]:
    """A callback that runs function(buffer) the first time it is called, from any thread."""
    lock = threading.Lock()
    done = False

    def call() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        function(buffer)

    return call


class NixlBackend(TransportBackend):
    def sender(self) -> FeatureSender:
        control = TcpBackend(self.config).sender()
        try:
            return NixlSender(self.config, control)
        except BaseException:
            control.close()
            raise

    def receiver(self, host: str, port: int, max_frame_bytes: int = base.DEFAULT_MAX_FRAME_BYTES) -> FeatureReceiver:
        control = TcpBackend(self.config).receiver(host, port, max_frame_bytes)
        try:
            return NixlReceiver(self.config, control, max_frame_bytes)
        except BaseException:
            control.close()
            raise
