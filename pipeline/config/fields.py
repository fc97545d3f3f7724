"""Plain YAML data -> typed frozen dataclasses, and the value checks the config sections share.

`build` walks a dataclass's type hints, coerces each value (Literal, X | None, tuple[...],
bool/int/float/str, nested sections), rejects unknown keys and calls the section's `check()`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration file names an unknown key or holds a bad value."""


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known keys here: {', '.join(fields)})")
    values = {name: coerce(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw}
    try:
        instance = cls(**values)
        instance.check()
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix}{exc}") from None
    return instance


def coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(inner, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (inner, _ellipsis) = typing.get_args(hint)
        return tuple(coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}: must be > 0, got {getattr(obj, name)!r}")


def non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(obj, name)!r}")


def cpu_list(obj: Any, groups: int = 1) -> None:
    """`obj.cpus`: distinct CPU ids >= 0 that split evenly into `groups` (one per replica), each with
    at least `obj.threads` CPUs."""
    cpus = obj.cpus
    if not cpus:
        return
    if min(cpus) < 0 or len(set(cpus)) != len(cpus):
        raise ValueError(f"cpus: CPU ids must be distinct and >= 0, got {list(cpus)}")
    if len(cpus) % groups:
        raise ValueError(f"cpus: {len(cpus)} CPUs do not split evenly between {groups} replicas")
    if obj.threads > len(cpus) // groups:
        raise ValueError(f"threads ({obj.threads}) exceeds the {len(cpus) // groups} CPUs in cpus"
                         + (" per replica" if groups > 1 else ""))


def ports(obj: Any, *names: str, last: int = 0, off_ok: bool = False) -> None:
    """Each port (and port + `last`, for replicas) in 1..65535; 0 too where it switches the endpoint off."""
    for name in names:
        port = getattr(obj, name)
        if port == 0 and off_ok:
            continue
        if not 1 <= port <= 65535:
            raise ValueError(f"{name}: not a TCP port: {port!r}" + (" (0 only switches metrics or the HTTP API off)" if port == 0 else ""))
        if port + last > 65535:
            raise ValueError(f"{name}: replica {last} would use port {port + last}, above 65535")


def distinct_ports(endpoints: list[tuple[str, int]], prefix: str) -> None:
    seen: dict[int, str] = {}
    for key, port in endpoints:
        if port in seen:
            raise ConfigError(f"{prefix}{key} and {prefix}{seen[port]} both use port {port}")
        seen[port] = key


_ANY_HOST = ("", "0.0.0.0", "::", "[::]", "*")


def wildcard(host: str) -> bool:
    """A bind address meaning every interface."""
    return host in _ANY_HOST


def loopback(host: str) -> bool:
    """An address only this machine reaches."""
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def same_host(a: str, b: str) -> bool:
    return a == b or wildcard(a) or wildcard(b)


def host_port(address: str, key: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{key}: expected host:port, got {address!r}")
    return host, int(port)


def tls_files(obj: Any) -> None:
    """`obj.tls_cert`, `tls_key`, `tls_client_ca`: the cert and key come together, a client CA needs
    them, and every file named can be read (whether it holds valid PEM is checked at server start)."""
    if bool(obj.tls_cert) != bool(obj.tls_key):
        given, missing = ("tls_cert", "tls_key") if obj.tls_cert else ("tls_key", "tls_cert")
        raise ValueError(f"{given}: set without {missing}; TLS needs both a certificate chain and its private key")
    if obj.tls_client_ca and not obj.tls_cert:
        raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(obj, name)
        if not path:
            continue
        if not os.path.exists(path):
            raise ValueError(f"{name}: no such file: {path!r}")
        if not os.path.isfile(path):
            raise ValueError(f"{name}: not a file: {path!r}")
        if not os.access(path, os.R_OK):
            raise ValueError(f"{name}: cannot read {path!r} (permission denied)")


def media_dirs(obj: Any) -> None:
    """`obj.allowed_media_dirs`: absolute paths of existing directories."""
    for i, path in enumerate(obj.allowed_media_dirs):
        key = f"allowed_media_dirs[{i}]"
        if not os.path.isabs(path):
            raise ValueError(f"{key}: must be an absolute directory path, got {path!r}")
        if not os.path.isdir(path):
            raise ValueError(f"{key}: no such directory: {path!r}")
