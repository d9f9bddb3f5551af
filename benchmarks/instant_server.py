"""A server that answers /v1/completions streams at once: `bench serve`'s own ceiling.

    python benchmarks/instant_server.py --port 8766

Each request streams `max_tokens` one-word chunks as fast as the event loop can write them,
then a usage chunk and [DONE], exactly in tokenmill serve's SSE shape. Whatever output tok/s
`tokenmill bench serve` reaches against it is the most the client can measure.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.get("/health")
async def health():
    return {"status": "ok"}


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": "instant", "object": "model"}]}


@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    max_tokens = int(body.get("max_tokens") or 16)
    prompt = body.get("prompt")
    num_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())

    async def events():
        for i in range(max_tokens):
            chunk = {
                "id": "cmpl-instant",
                "object": "text_completion",
                "model": "instant",
                "choices": [{"index": 0, "text": " tok", "finish_reason": None}],
            }
            if i == max_tokens - 1:
                chunk["choices"][0]["finish_reason"] = "length"
            yield f"data: {json.dumps(chunk)}\n\n"
        usage = {
            "prompt_tokens": num_prompt,
            "completion_tokens": max_tokens,
            "total_tokens": num_prompt + max_tokens,
        }
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
