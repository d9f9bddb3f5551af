"""uvicorn with a bounded shutdown: SIGTERM / Ctrl-C stops accepting at once, lets requests in
flight run for `shutdown_timeout` seconds, then aborts them through the engine (clients get a
503, or an error event in a stream) so that the process exits in bounded time."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Any, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    async def shutdown(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().call_later(
            self.shutdown_timeout,
            self.engine.abort_all,
            f"the server is shutting down (requests in flight got {self.shutdown_timeout}s)",
        )
        await super().shutdown(sockets)
