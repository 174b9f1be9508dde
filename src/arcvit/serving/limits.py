"""A cap on request bodies, enforced while they arrive (ASGI middleware): an oversized upload is refused from
its Content-Length header, or as soon as a streamed body passes the cap, never read whole into memory."""
from __future__ import annotations

import json


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the cap; the route answers 413."""


class BodyLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = (413, f"upload is larger than {self.max_bytes} bytes") if length.isdigit() else \
                (400, "bad Content-Length header")
            return await _answer(send, status, message)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(f"upload is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
