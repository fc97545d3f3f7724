"""The bytes behind an image or video URL of the HTTP API: base64 `data:` URLs, `file://` URLs
under the configured directories, and `http(s)://` URLs when remote fetching is on.

Every source is read within the size limit of its kind before anything is decoded, and decoding
and file reads run in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from pathlib import Path
from typing import AsyncIterator, Literal
from urllib.parse import unquote, urlparse

import httpx

from language_server.limits import check_media_size, media_size_limit
from pipeline.config import DvDConfig
from pipeline.errors import InvalidRequest, PayloadTooLarge

Kind = Literal["image", "video"]
MAX_REDIRECTS = 3


class MediaUrls:
    """Loads media URLs as the deployment's `language` section allows."""

    def __init__(self, config: DvDConfig) -> None:
        self.config = config
        lc = config.language
        self.allowed_dirs = tuple(Path(d).resolve() for d in lc.allowed_media_dirs)

    async def load(self, url: str, kind: Kind, where: str) -> bytes:
        """The encoded file at `url`; InvalidRequest (PayloadTooLarge over a limit) names the problem."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return await self._data(url, kind, where)
        if scheme == "file":
            return await self._file(url, kind, where)
        if scheme in ("http", "https"):
            return await self._remote(url, kind, where)
        raise InvalidRequest(f"{where}: unsupported URL {_short(url)!r}: use a base64 data: URL, file:// or http(s)://")

    async def _data(self, url: str, kind: Kind, where: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequest(f"{where}: a data: URL must be base64-encoded (data:<type>;base64,<data>)")
        check_media_size(kind, len(payload) // 4 * 3 - payload.count("=", -2), where, self.config)
        try:
            return await asyncio.to_thread(base64.b64decode, payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{where}: the data: URL is not valid base64") from None

    async def _file(self, url: str, kind: Kind, where: str) -> bytes:
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequest(f"{where}: file:// URLs must name a local file, not host {parsed.netloc!r}")
        if not self.allowed_dirs:
            raise InvalidRequest(f"{where}: file:// URLs are off on this server (language.allowed_media_dirs is empty)")
        return await asyncio.to_thread(self._read_file, unquote(parsed.path), kind, where)

    def _read_file(self, path: str, kind: Kind, where: str) -> bytes:
        try:
            resolved = Path(path).resolve(strict=True)
        except (OSError, RuntimeError):
            raise InvalidRequest(f"{where}: no such file: {_short(path)!r}") from None
        if not any(resolved.is_relative_to(d) for d in self.allowed_dirs):
            raise InvalidRequest(f"{where}: {_short(path)!r} is outside language.allowed_media_dirs")
        if not resolved.is_file():
            raise InvalidRequest(f"{where}: {_short(path)!r} is not a regular file")
        check_media_size(kind, os.path.getsize(resolved), where, self.config)
        limit = media_size_limit(kind, self.config)
        try:
            with open(resolved, "rb") as file:
                data = file.read(limit + 1)
        except OSError as exc:
            raise InvalidRequest(f"{where}: cannot read {_short(path)!r}: {exc.strerror}") from None
        check_media_size(kind, len(data), where, self.config)
        return data

    async def _remote(self, url: str, kind: Kind, where: str) -> bytes:
        lc = self.config.language
        if not lc.fetch_remote_media:
            raise InvalidRequest(
                f"{where}: http(s) media URLs are off on this server (language.fetch_remote_media is false); "
                "send the file as a base64 data: URL"
            )
        limit = min(lc.remote_media_max_bytes, media_size_limit(kind, self.config))
        try:
            async with asyncio.timeout(lc.remote_media_timeout_s):
                return await _fetch(url, limit, where)
        except TimeoutError:
            raise InvalidRequest(f"{where}: fetching {_short(url)!r} took over {lc.remote_media_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"{where}: cannot fetch {_short(url)!r}: {type(exc).__name__}") from None


async def _fetch(url: str, limit: int, where: str) -> bytes:
    too_large = f"{where}: {_short(url)!r} is over the limit of {limit} bytes for fetched media"
    async with httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS, trust_env=False) as client:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise InvalidRequest(f"{where}: fetching {_short(url)!r} answered HTTP {response.status_code}")
            return await read_bounded(response.aiter_bytes(), response.headers.get("content-length", ""), limit,
                                      too_large)


async def read_bounded(chunks: AsyncIterator[bytes], declared_length: str, limit: int, too_large: str) -> bytes:
    """A body of at most `limit` bytes: refused by its declared length when it has one, and by what
    arrives otherwise, without reading further (PayloadTooLarge with the message `too_large`)."""
    if declared_length.isdigit() and int(declared_length) > limit:
        raise PayloadTooLarge(too_large)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(too_large)
        parts.append(chunk)
    return b"".join(parts)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
