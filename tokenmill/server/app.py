"""The OpenAI-compatible HTTP app: `build_app(engine, served_model_name, api_key, limits)`.

Importing this module imports FastAPI; `tokenmill` and `tokenmill.engine` never import it.
Handlers are thin: validate (pydantic, strict), map the body onto SamplingParams (the engine's
OpenAI adapter), tokenize and check on a tokenizer thread (the engine's InputProcessor), add
the request(s) to the engine core in one message, then stream or collect the outputs.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill import __version__
from tokenmill.engine.core_messages import EngineRequest
from tokenmill.server.async_engine import AsyncEngine
from tokenmill.server.chat import ChatStream, template_messages
from tokenmill.server.completions import CompletionStream, prepare_prompts, split_prompts
from tokenmill.server.errors import APIError, error_body, install_error_handlers
from tokenmill.server.limits import BodyLimitMiddleware, ServerLimits, body_bytes
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    random_id,
)
from tokenmill.server.serving import sse_stream, watch_disconnect
from tokenmill.server.tools import ToolError, plan_tools

# Routes that need the API key (when the server has one): everything that runs the tokenizer
# or the model. /health, /metrics and /version stay open.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


class APIKeyMiddleware:
    """401 for protected routes without 'Authorization: Bearer <key>'. Plain ASGI, so that the
    handlers still see the client's disconnect (BaseHTTPMiddleware would hide it)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(
                token.strip(), self.api_key
            ):
                message = (
                    "Incorrect API key provided."
                    if given
                    else "Missing API key: send the header 'Authorization: Bearer <key>'."
                )
                body = error_body(401, message, code="invalid_api_key")
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: AsyncEngine,
    served_model_name: str | None = None,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    tool_call_parser: str | None = None,
):
    """A FastAPI app serving `engine`; the engine core runs while the app's lifespan does.

    `tool_call_parser` (server/tools.py) reads tool calls out of chat text for tool_choice
    auto; without one, such requests are a 400 that says so."""
    limits = limits or ServerLimits()
    model_name = served_model_name or engine.info.model_name or "tokenmill"
    max_model_len = engine.limits.max_model_len
    metrics = ServerMetrics(model_name, lambda: engine.stats, lambda: engine.num_aborted)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.abort_all()
            engine.shutdown()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.model_name = model_name
    app.state.limits = limits
    install_error_handlers(app)
    # Added last = outermost: the key is checked before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves "
                f"`{model_name}` (see GET /v1/models).",
                "model",
                "model_not_found",
            )

    def on_finish(timer, out) -> None:
        timer.finish(metrics, out)

    async def respond(request: Request, fmt: Any, outputs: Any, stream: bool):
        if stream:
            events = sse_stream(fmt.sse_events(outputs, on_finish))
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(await watch_disconnect(request, fmt.collect(outputs, on_finish)))

    def submit(base_id: str, token_ids: list[list[int]], params, stream: bool):
        queue: asyncio.Queue = asyncio.Queue()
        # Streamed text is decoded in this process (off the engine core) unless the core needs
        # it itself (stop strings, logprobs); a collected answer is decoded once, at the end.
        detokenize = not stream or EngineRequest.needs_core_text(params) or not engine.has_tokenizer
        requests = [
            EngineRequest(f"{base_id}-{i}", ids, params, stream, detokenize)
            for i, ids in enumerate(token_ids)
        ]
        engine.add(requests, queue)
        rids = [r.request_id for r in requests]
        return rids, engine.stream(rids, queue)

    def model_card() -> ModelCard:
        return ModelCard(id=model_name, root=engine.info.model_name, max_model_len=max_model_len)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return ModelList(data=[model_card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        check_model(model_id)
        return model_card().model_dump()

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """What clients that tokenize locally (lm-eval) need to match the server's tokenizer."""

        def describe(proc):
            tok = proc.tokenizer
            if tok is None:
                raise APIError(404, "this engine runs without a tokenizer", code="no_tokenizer")
            return {
                "tokenizer_class": type(tok).__name__,
                "model_max_length": max_model_len,
                "vocab_size": len(tok),
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": tok.pad_token,
                "unk_token": tok.unk_token,
                "chat_template": getattr(tok, "chat_template", None),
            }

        return await engine.prepare(describe)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = body.to_sampling_params()
        prompts = split_prompts(body.prompt)
        prepared = await engine.prepare(
            lambda proc: prepare_prompts(proc, prompts, params, body.echo), body_bytes(request)
        )
        rids, outputs = submit(
            random_id("cmpl"), [p.token_ids for p in prepared], params, body.stream
        )
        fmt = CompletionStream(body, params, model_name, prepared, rids)
        return await respond(request, fmt, outputs, body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = body.to_sampling_params()
        try:
            tools = plan_tools(body.tools, body.tool_choice, tool_call_parser)
        except ToolError as e:
            raise APIError(400, str(e), e.param) from e
        if tools is not None and tools.constraint is not None:
            if params.structured_outputs is not None:
                raise APIError(
                    400,
                    "tool_choice required / a named function already constrains the output; "
                    "drop response_format",
                    "tool_choice",
                )
            params = params.replace(structured_outputs=tools.constraint)
        messages = template_messages(body.messages)
        template_kwargs = {"tools": tools.template_tools} if tools is not None else {}
        processed = await engine.prepare(
            lambda proc: proc.process_messages(messages, params, **template_kwargs),
            body_bytes(request),
        )
        rid = random_id("chatcmpl")
        rids, outputs = submit(rid, [processed.prompt_token_ids], params, body.stream)
        num_prompt = len(processed.prompt_token_ids)
        fmt = ChatStream(body, params, model_name, rids[0], num_prompt, tools)
        return await respond(request, fmt, outputs, body.stream)

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse(error_body(503, "the engine is not running"), 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt or messages", "prompt")
        messages = template_messages(body.messages) if body.messages is not None else None

        def run(proc):
            if messages is not None:
                return proc.encode_messages(messages)
            proc.check_text(body.prompt, "prompt")
            return proc.encode_texts([body.prompt], body.add_special_tokens)[0]

        tokens = await engine.prepare(run, body_bytes(request))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        check_model(body.model)

        def run(proc):
            proc.check_token_ids(body.tokens, "tokens")
            return proc.tokenizer.decode(body.tokens)

        return {"prompt": await engine.prepare(run, body_bytes(request))}

    return app
