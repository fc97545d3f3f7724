"""TLS of the public gRPC API: the server's credentials, a client's, and how the launcher dials
a server that serves TLS. Only the public API is encrypted; the internal links stay plaintext
(on loopback by default)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pipeline.config.fields import wildcard


class TlsError(ValueError):
    """A TLS certificate, key or CA file cannot be used."""


def server_credentials(lc: Any) -> grpc.ServerCredentials | None:
    """TLS credentials of the public API from `language.tls_*` (None when TLS is off); mutual TLS
    (clients must present a certificate signed by tls_client_ca) when tls_client_ca is set.

    The files are checked here, so that a malformed PEM stops start-up with a TlsError naming the
    key and the file instead of failing every handshake later."""
    if not lc.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(lc.tls_cert, lc.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"language.tls_cert / language.tls_key ({lc.tls_cert}, {lc.tls_key}): not a PEM certificate chain "
            f"and its matching private key: {exc}"
        ) from None
    client_ca = None
    if lc.tls_client_ca:
        try:
            context.load_verify_locations(cafile=lc.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"language.tls_client_ca ({lc.tls_client_ca}): not a PEM CA bundle: {exc}") from None
        client_ca = Path(lc.tls_client_ca).read_bytes()
    return grpc.ssl_server_credentials(
        [(Path(lc.tls_key).read_bytes(), Path(lc.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def tls_mode(lc: Any) -> str:
    """"off", "on" or "mutual": how the public API of `language` settings `lc` is served."""
    return "off" if not lc.tls_cert else "mutual" if lc.tls_client_ca else "on"


def client_identity_error(cert: str, key: str, client_ca: str) -> str | None:
    """Why a server requiring certificates signed by `client_ca` would refuse a client presenting
    `cert` and `key` (None: it would accept it). A TLS handshake between two in-memory ends."""
    try:
        server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_side.load_cert_chain(cert, key)
        server_side.load_verify_locations(cafile=client_ca)
        server_side.verify_mode = ssl.CERT_REQUIRED
        client_side = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_side.check_hostname = False
        client_side.verify_mode = ssl.CERT_NONE
        client_side.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    client = client_side.wrap_bio(pipes[0], pipes[1])
    server = server_side.wrap_bio(pipes[2], pipes[3], server_side=True)
    for _ in range(8):  # a TLS 1.2 or 1.3 handshake needs fewer flights
        for end, outgoing, peer in ((client, pipes[1], pipes[2]), (server, pipes[3], pipes[0])):
            try:
                end.do_handshake()
                if end is server:
                    return None
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as exc:
                return getattr(exc, "verify_message", None) or exc.reason or str(exc)
            peer.write(outgoing.read())
    return "the handshake did not complete"


def channel_credentials(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: `ca` is the root the server must chain to (None = the system
    roots); `cert` and `key` are this client's identity for mutual TLS."""
    if bool(cert) != bool(key):
        raise ValueError("a TLS client certificate needs its private key, and the key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


@dataclass(frozen=True)
class TlsDial:
    """The launcher's TLS settings for the language server's port: it trusts the server's own
    certificate (tls_cert) and, with mutual TLS, presents that certificate and key as its client
    identity, so the server's certificate must also be one that tls_client_ca accepts."""

    root: str  # PEM files
    cert: str | None = None
    key: str | None = None
    server_name: str = ""  # TLS name checked in place of the dialled host; "" = the host

    @classmethod
    def of(cls, lc: Any) -> TlsDial | None:
        if not lc.tls_cert:
            return None
        mutual = bool(lc.tls_client_ca)
        # a wildcard bind address is no name a certificate holds: check the certificate for localhost
        name = "localhost" if wildcard(lc.host) else ""
        return cls(lc.tls_cert, lc.tls_cert if mutual else None, lc.tls_key if mutual else None, name)

    def channel(self, address: str, options: list[tuple[str, object]] = ()) -> grpc.Channel:
        credentials = channel_credentials(self.root, self.cert, self.key)
        options = [*options, *([("grpc.ssl_target_name_override", self.server_name)] if self.server_name else [])]
        return grpc.secure_channel(address, credentials, options=options)
