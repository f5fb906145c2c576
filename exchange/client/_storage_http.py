"""Blocking HTTP to presigned storage URLs, for worker threads.

Transfers move the bytes on worker threads, not on the event loop: a thread that reads a part
with `readinto` into a reused buffer, decrypts it and writes it, or encrypts a part and sends it
with one `sendall`, holds the GIL only between those C calls. Measured on 2 cores, the same work
through aiohttp on the event loop was about half as fast: every received byte was copied through
its stream buffer under the GIL, in the same thread that scheduled everything else.

Each thread keeps one kept-alive connection per storage host. Answers are classified here:
a retryable failure raises `StorageUnavailable(code="storage-retry")`, a refusal
`StorageUnavailable(code="storage-refused")`; network errors are left as OSError /
HTTPException for the caller's retry loop.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Iterable, Mapping

from ..errors import StorageUnavailable

__all__ = ["RETRYABLE", "StorageHTTP", "raise_for_answer"]

#: Failures worth another attempt (with a fresh URL where the URL is the problem).
RETRYABLE = (OSError, http.client.HTTPException)
_RETRY_CODES = {"RequestTimeTooSkewed", "AccessDenied", "SlowDown", "RequestTimeout", "ExpiredToken"}


def raise_for_answer(resp: http.client.HTTPResponse, what: str) -> None:
    """Raise unless the answer is a success; reads (and so frees) the error body."""
    if resp.status < 300:
        return
    body = resp.read(4000).decode("utf-8", "replace")
    code = body.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in body else str(resp.status)
    if resp.status >= 500 or code in _RETRY_CODES:
        raise StorageUnavailable(f"storage answered {resp.status} ({code}) to {what}", code="storage-retry")
    raise StorageUnavailable(f"storage refused {what}: {resp.status} ({code})", code="storage-refused")


class StorageHTTP:
    def __init__(self, *, timeout_s: float = 120.0) -> None:
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {}
        )
        conn = conns.get((scheme, netloc))
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = cls(netloc, timeout=self._timeout_s)
            conns[(scheme, netloc)] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | memoryview | Iterable[bytes | memoryview] | None = None,
    ) -> http.client.HTTPResponse:
        """Send one request on this thread's connection; the caller reads the answer to its end."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise StorageUnavailable("a storage URL must be http(s)")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._connection(parts.scheme, parts.netloc)
        try:
            conn.request(method, target, body=body, headers=dict(headers))
            return conn.getresponse()
        except BaseException:
            self.drop(url)
            raise

    def drop(self, url: str) -> None:
        """Close this thread's connection to the URL's host (after an error or an unread answer)."""
        parts = urllib.parse.urlsplit(url)
        conns = self._local.__dict__.get("conns", {})
        conn = conns.pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
