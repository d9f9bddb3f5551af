"""What one request may ask of the server, and the body-size gate that runs before parsing.

Every limit refuses early with a 400/413 that names it and the flag that raises it; nothing
that exceeds a limit reaches the JSON parser, the tokenizer or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds of `tokenmill serve` (each a --flag of the same name)."""

    max_request_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata={"help": "Largest request body in bytes; a bigger one gets a 413 unparsed."},
    )
    max_prompt_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Largest prompt or message text in bytes, checked before tokenizing "
            "(default: 64 per token of the model's context)."
        },
    )
    shutdown_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "On SIGTERM or Ctrl-C, seconds in-flight requests may still run before "
            "they are aborted and the server exits."
        },
    )

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024 (got {self.max_request_bytes})")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be >= 1 (got {self.max_prompt_bytes})")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0 (got {self.shutdown_timeout_s})")


BODY_BYTES = "tokenmill.body_bytes"


def body_bytes(request: Any) -> int | None:
    """The request body's size in bytes, as BodyLimitMiddleware read it (None if it did not)."""
    return request.scope.get(BODY_BYTES)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`, announced (Content-Length) or streamed.

    The body is read here, up to the limit, and replayed to the app; later `receive()` calls
    go to the client, so handlers still see a disconnect. Plain ASGI (not BaseHTTPMiddleware,
    which would hide the disconnect)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        scope[BODY_BYTES] = size  # read by body_bytes(): small bodies are prepared inline
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        from fastapi.responses import JSONResponse

        from tokenmill.server.errors import error_body

        message = (
            f"the request body is larger than the server's limit of {self.max_bytes} bytes; "
            "send less (the server's --max-request-bytes sets the limit)"
        )
        body = error_body(413, message, code="request_too_large")
        await JSONResponse(body, 413)(scope, receive, send)
