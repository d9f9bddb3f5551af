"""Bad requests get OpenAI's error shape and the right status, never a 500."""

from __future__ import annotations

import httpx
import openai
import pytest


def assert_error_shape(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        yield c


def test_missing_or_wrong_key_is_401(server):
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2}
    err = assert_error_shape(httpx.post(server.base_url + "/completions", json=body), 401)
    assert err["type"] == "authentication_error"
    wrong = {"Authorization": "Bearer nope"}
    assert_error_shape(httpx.post(server.base_url + "/completions", json=body, headers=wrong), 401)
    assert_error_shape(httpx.get(server.base_url + "/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()
    # Outside /v1 no key is needed.
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_model_is_404(server, http):
    err = assert_error_shape(
        http.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404
    )
    assert "gpt-4" in err["message"] and err["code"] == "model_not_found"
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_prompt_longer_than_the_context_is_400_naming_the_limit(server, http):
    limit = server.max_model_len
    prompt = [5] * (limit + 10)
    err = assert_error_shape(
        http.post("/v1/completions", json={"model": server.model, "prompt": prompt}), 400
    )
    assert str(limit) in err["message"]
    err = assert_error_shape(
        http.post(
            "/v1/completions", json={"model": server.model, "prompt": [5] * 10, "max_tokens": limit}
        ),
        400,
    )
    assert str(limit) in err["message"]
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match=str(limit)):
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hello " * limit}]
        )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "presence_penalty": 9}, "presence_penalty"),
        ({"prompt": "hi", "logprobs": 99}, "logprobs"),
        ({"prompt": "hi", "top_k": -5}, "top_k"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [10**9]}, "vocabulary"),
        ({"prompt": {"not": "a prompt"}}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ],
)
def test_invalid_completion_parameters_are_400(server, http, body, param):
    err = assert_error_shape(
        http.post("/v1/completions", json={"model": server.model, **body}), 400
    )
    assert err["type"] == "invalid_request_error"
    assert param in err["message"] or err["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    ],
)
def test_invalid_chat_requests_are_400(server, http, body):
    assert_error_shape(http.post("/v1/chat/completions", json={"model": server.model, **body}), 400)


def test_malformed_json_and_unknown_routes(http):
    resp = http.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error_shape(resp, 400)
    assert_error_shape(http.get("/v1/nothing-here"), 404)
    assert_error_shape(http.get("/v1/completions"), 405)


def test_tokenize_detokenize_round_trip(server, http, reference_llm):
    resp = http.post("/tokenize", json={"prompt": "The quick brown fox"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == server.max_model_len
    text = http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert "The quick brown fox" in text
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == reference_llm.encode_chat([{"role": "user", "content": "hi"}])
    assert_error_shape(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert_error_shape(http.post("/tokenize", json={}), 400)


def test_version_and_health(server, http):
    from tokenmill import __version__

    assert http.get("/version").json() == {"version": __version__}
    assert http.get("/health").json() == {"status": "ok"}
