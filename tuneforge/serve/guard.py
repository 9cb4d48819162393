"""Request bodies bounded before any route reads them: their size, and how deep JSON nests.

One ASGI middleware in front of the whole app, so the inference endpoints and every router
added later get the same limits without a line of their own. A body is read in full (up to the
limit) and handed on unchanged; past the limit the answer is 413 without reading the rest. JSON
nested deeper than :data:`MAX_JSON_DEPTH` is a 400: Python's decoder recurses once per level and
about 1,000 levels (2 KB of brackets) exhaust the stack, a 500 from any handler that parses it.
Every body but ``multipart/form-data`` counts as JSON here, since handlers may parse a body
whatever its content type claims; multipart uploads (files) are only counted, against their own
larger limit, and are never held in memory by the guard.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from tuneforge.serve.protocol import APIError

MAX_JSON_DEPTH = 64  # far beyond any real request; far below the decoder's recursion limit

Refuse = Callable[[dict, APIError], Any]  # (scope, error) -> an ASGI response for it
# A JSON string literal, escapes included; unterminated at the end of the body is fine too.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of ``body`` nest (brackets inside strings don't count).

    Valid JSON or not: a body that is not JSON gets a number too, and the parser says what is
    wrong with it afterwards. Linear time, no recursion.
    """
    brackets = _STRING.sub(b"", body)
    if not brackets:
        return 0
    steps = _STEP[np.frombuffer(brackets, dtype=np.uint8)].astype(np.int32)
    return max(0, int(np.cumsum(steps).max()))


class BodyGuard:
    """ASGI middleware: 413 past ``max_bytes`` (``max_upload_bytes`` for multipart bodies),
    400 for JSON nested deeper than ``MAX_JSON_DEPTH``; ``refuse`` builds the response."""

    def __init__(self, app, *, max_bytes: int, max_upload_bytes: int, refuse: Refuse) -> None:
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes
        self.refuse = refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # any method: a route may read a GET's body too
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        upload = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        limit = self.max_upload_bytes if upload else self.max_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, send, _too_large(limit))
            return
        if upload:
            await self._pass_counted(scope, receive, send, limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, _too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth(body) > MAX_JSON_DEPTH:
            await self._refuse(scope, receive, send, APIError(
                400, f"The JSON body nests arrays/objects more than {MAX_JSON_DEPTH} levels "
                     "deep, this server's limit", code="invalid_json"))
            return
        await self.app(scope, _replay(body, receive), send)

    async def _pass_counted(self, scope, receive, send, limit: int) -> None:
        """Stream the body through; once it passes ``limit``, answer 413 if nothing has been
        answered yet, tell the app the client left, and drop whatever the app sends after."""
        size, refused, started = 0, False, False

        async def counted_receive():
            nonlocal size, refused
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit and not refused:
                refused = True
                if not started:
                    await self._refuse(scope, _no_body, send, _too_large(limit))
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:  # the app's own failure; after a 413 it is just the disconnect
                raise

    async def _refuse(self, scope, receive, send, err: APIError) -> None:
        await self.refuse(scope, err)(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is over {limit} bytes, this server's limit",
                    code="request_too_large")


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A ``receive`` that gives the app the body already read, then waits on the real one
    (which reports a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}
