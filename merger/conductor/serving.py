"""What one HTTP client may send and hold, below the routes: body size and read time, header time,
connections; and the request's work cancelled when its client goes away.

uvicorn bounds an idle keep-alive connection but not one that has sent part of a request line or of its
headers: `bounded_h11_protocol` closes such a connection `header_timeout_s` after its first byte (or after
connecting, if nothing comes). `RequestLimits` reads the body itself, refusing it (413) past
`max_body_bytes` — from Content-Length before reading a byte, or while counting — and (408) when it has
not arrived within `read_timeout_s`; then it runs the app while watching for the client's disconnect,
and cancels the app (and so the upstream member call) when it comes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from merger.router.pool import ServerSettings

log = logging.getLogger("merger.conductor")


class _BodyRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestLimits:
    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
        except _BodyRefused as refused:
            await _send_error(send, refused.status, str(refused))
            return
        if body is None:  # the client left before sending its body
            return
        await self._run_until_disconnect(scope, body, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyRefused(413, f"request body over the server's {self.max_body_bytes:,} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise _BodyRefused(
                            413, f"request body over the server's {self.max_body_bytes:,} bytes"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _BodyRefused(408, f"request body not received within {self.read_timeout_s:g}s") from None

    async def _run_until_disconnect(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        disconnected = asyncio.Event()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        work = asyncio.ensure_future(self.app(scope, replay, send))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()
            work.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await work
        except asyncio.CancelledError:
            if not disconnected.is_set():
                raise  # this request itself was cancelled (server shutdown)
            log.info("client went away: request cancelled")
        finally:
            watcher.cancel()


async def _send_error(send: Send, status: int, message: str) -> None:
    kind = "request_too_large" if status == 413 else "request_timeout"
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bounded_h11_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers take longer than
    `header_timeout_s` from their first byte (or from connecting)."""

    class BoundedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_header_timer()  # part of a request line or headers: bounded from its first byte
            else:
                self._disarm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._disarm_header_timer()  # the idle wait for the next request is uvicorn's keep-alive
            super().on_response_complete()

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %gs", header_timeout_s)
                self.transport.close()

    return BoundedH11Protocol


def uvicorn_config(app: Any, settings: ServerSettings, host: str, port: int) -> uvicorn.Config:
    """The conductor's uvicorn settings: loopback unless told, no access log, and the client bounds."""
    return uvicorn.Config(
        app,  # create_app has put RequestLimits around it
        host=host,
        port=port,
        http=bounded_h11_protocol(settings.header_timeout_s),
        log_level="warning",
        # request lines are not needed, and headers never reach the logs this way
        access_log=False,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
