"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Bad input is a 400 (never a 500); a missing or wrong key a 401; an unknown model or route a
404. Only a bug in tokenmill itself gives a 500.
"""

from __future__ import annotations

from typing import Any

from tokenmill.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error a handler returns to the client, with its HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    err = ErrorInfo(
        message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code
    )
    return ErrorResponse(error=err).model_dump()


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI/pydantic validation errors -> one readable message and the offending field."""
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        parts.append(f"{where}: {e.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request body", param


def install_error_handlers(app: Any) -> None:
    """Make FastAPI answer with OpenAI-shaped errors for every exception it meets."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from tokenmill.engine.input_processor import InputError
    from tokenmill.server.async_engine import EngineDeadError
    from tokenmill.server.protocol import InvalidText

    def reply(
        status: int, message: str, param: str | None = None, code: str | None = None
    ) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return reply(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(InputError)
    async def _input_error(request, exc: InputError):
        return reply(400, exc.message, exc.param, exc.code)

    @app.exception_handler(InvalidText)
    async def _invalid_text(request, exc: InvalidText):
        return reply(400, str(exc), exc.param, "invalid_text")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return reply(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return reply(exc.status_code, str(exc.detail))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request, exc: EngineDeadError):
        return reply(503, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return reply(500, f"internal error: {exc!r}; please report it")
