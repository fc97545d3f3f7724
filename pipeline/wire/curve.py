"""CurveZMQ on the internal plane (`transport.auth: curve`): the job and feature sockets encrypt
and authenticate with the deployment's key pair. Every server of a deployment holds the same
pair; a socket that binds accepts only peers that prove they hold it, so a process without the
deployment's key file can neither submit a job nor deliver (or receive) features.

`generate_keys` writes the pair as ZMQ certificate files into a private directory; the launcher
makes one per deployment when `transport.curve_key_file` is empty.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

KEY_NAME = "deployment"
_authenticator: ThreadAuthenticator | None = None
_authenticator_lock = threading.Lock()
_members: set[bytes] = set()  # public keys of the deployments whose sockets this process binds


class CurveError(RuntimeError):
    """The deployment's key file is missing or unusable."""


@dataclass(frozen=True)
class CurveKeys:
    public: bytes  # z85
    secret: bytes  # z85


class _Members:
    @staticmethod
    def callback(domain: str, client_key: bytes) -> bool:
        """ZAP: a connecting peer is let in only with its deployment's public key."""
        return client_key in _members


def generate_keys(directory: str | os.PathLike[str]) -> Path:
    """Write a new key pair into `directory` (made private); returns the secret key file's path."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    _, secret_file = zmq.auth.create_certificates(str(directory), KEY_NAME)
    Path(secret_file).chmod(0o600)
    return Path(secret_file)


def launcher_key_file(auth: str, key_file: str) -> Path | None:
    """A fresh key pair in a private temporary directory when `auth` is curve and no key file is given."""
    if auth != "curve" or key_file:
        return None
    return generate_keys(tempfile.mkdtemp(prefix="dvd-curve-"))


@lru_cache(maxsize=4)
def load_keys(path: str) -> CurveKeys:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"transport.curve_key_file: cannot read {path}: {exc}") from None
    if not secret:
        raise CurveError(f"transport.curve_key_file: {path} holds no secret key (use the .key_secret file)")
    return CurveKeys(public, secret)


def deployment_keys(auth: str, key_file: str) -> CurveKeys | None:
    """The keys `transport.auth` asks for (None: no authentication)."""
    if auth != "curve":
        return None
    if not key_file:
        raise CurveError("transport.auth is curve but transport.curve_key_file is empty "
                         "(dvd serve makes one; for servers started by hand: python -m pipeline keys DIR)")
    return load_keys(key_file)


def secure_bound(socket: zmq.Socket, keys: CurveKeys | None) -> None:
    """Before bind: accept only peers holding the deployment's keys."""
    if keys is None:
        return
    _start_authenticator(keys)
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def secure_connecting(socket: zmq.Socket, keys: CurveKeys | None) -> None:
    """Before connect: prove the deployment's keys to a bound socket that asks for them."""
    if keys is None:
        return
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.public


def _start_authenticator(keys: CurveKeys) -> None:
    """One ZAP handler per process (per ZMQ context); every deployment key it binds with is let in."""
    global _authenticator
    with _authenticator_lock:
        _members.add(keys.public)
        if _authenticator is None:
            _authenticator = ThreadAuthenticator(zmq.Context.instance())
            _authenticator.start()
            _authenticator.configure_curve_callback(domain="*", credentials_provider=_Members())
