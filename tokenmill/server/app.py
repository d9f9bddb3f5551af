"""The OpenAI-compatible HTTP app: `build_app(llm, served_model_name, api_key)`.

Importing this module imports FastAPI; `tokenmill` and `tokenmill.engine` never import it.
Handlers are thin: validate (pydantic), tokenize and check on the engine thread, add the
request(s), then stream or collect the outputs. Everything that touches the LLM goes through
the AsyncEngine.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tokenmill import __version__
from tokenmill.server.async_engine import AsyncEngine
from tokenmill.server.chat import ChatStream, encode_messages
from tokenmill.server.completions import (
    CompletionStream,
    add_all,
    prepare_prompts,
    split_prompts,
)
from tokenmill.server.errors import APIError, error_body, install_error_handlers
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
from tokenmill.server.serving import check_prompt, check_token_ids, sse_stream, watch_disconnect
from tokenmill.server.structured import check_logit_bias
from tokenmill.server.tools import ToolError, plan_tools


class APIKeyMiddleware:
    """401 for /v1/* without 'Authorization: Bearer <key>'. Plain ASGI, so that the handlers
    still see the client's disconnect (BaseHTTPMiddleware would hide it)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
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


def default_model_name(llm: Any) -> str:
    info = llm.model_info()
    return str(info.get("model") or "tokenmill")


def build_app(
    llm: Any,
    served_model_name: str | None = None,
    api_key: str | None = None,
    tool_call_parser: str | None = None,
):
    """A FastAPI app serving `llm`; its engine thread runs while the app's lifespan does.

    `tool_call_parser` (server/tools.py) reads tool calls out of chat text for tool_choice
    auto; without one, such requests are a 400 that says so."""
    model_name = served_model_name or default_model_name(llm)
    engine = AsyncEngine(llm)
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.model_name = model_name
    install_error_handlers(app)

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

    def sampling_params(body):
        try:
            return body.to_sampling_params()
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def add(engine_call):
        try:
            return await engine_call
        except ValueError as e:  # the engine refused the request: the message says why
            raise APIError(400, str(e)) from e

    async def respond(request: Request, fmt: Any, outputs: Any, stream: bool):
        if stream:
            events = sse_stream(fmt.sse_events(outputs, on_finish))
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(await watch_disconnect(request, fmt.collect(outputs, on_finish)))

    def model_card() -> ModelCard:
        return ModelCard(
            id=model_name, root=str(llm.config.model or model_name), max_model_len=llm.max_model_len
        )

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
        tok = llm.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "model_max_length": llm.max_model_len,
            "vocab_size": len(tok),
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": getattr(tok, "chat_template", None),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = sampling_params(body)
        prompts = split_prompts(body.prompt)

        def prepare(llm):
            check_logit_bias(llm, params)
            return prepare_prompts(llm, prompts, params, body.echo)

        prepared = await engine.call(prepare)
        queue: asyncio.Queue = asyncio.Queue()
        rids = await add(
            add_all(
                engine,
                random_id("cmpl"),
                [p.token_ids for p in prepared],
                params,
                queue,
                body.stream,
            )
        )
        fmt = CompletionStream(body, params, model_name, prepared, rids)
        return await respond(request, fmt, engine.stream(rids, queue), body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = sampling_params(body)
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

        def prepare(llm):
            check_logit_bias(llm, params)
            ids = encode_messages(llm, body.messages, tools.template_tools if tools else None)
            check_prompt(llm, ids, params, "messages")
            return ids

        ids = await engine.call(prepare)
        queue: asyncio.Queue = asyncio.Queue()
        rid = random_id("chatcmpl")
        await add(engine.add(rid, ids, params, queue, body.stream))
        fmt = ChatStream(body, params, model_name, rid, len(ids), tools)
        return await respond(request, fmt, engine.stream([rid], queue), body.stream)

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse(error_body(503, "the engine is not running"), 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        text = metrics.render(engine.snapshot, model_name)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt or messages", "prompt")

        def run(llm):
            if body.messages is not None:
                return encode_messages(llm, body.messages)
            return list(
                llm.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            )

        tokens = await engine.call(run)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": llm.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)

        def run(llm):
            check_token_ids(llm, body.tokens, "tokens")
            return llm.tokenizer.decode(body.tokens)

        return {"prompt": await engine.call(run)}

    return app
