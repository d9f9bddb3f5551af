"""lm-eval (EleutherAI's evaluation harness) end to end: the `lm_eval` command in a subprocess
against a real `tokenmill serve` subprocess, on the local tasks in tests/server/lm_eval_task
(multiple_choice, generate_until and loglikelihood_rolling; their data are JSON Lines files
beside them, so nothing downloads).

Passing is not enough: the numbers lm-eval logged (--log_samples) must be the engine's own.
Every loglikelihood equals the sum of the prompt logprobs that LLM(...) computes for the same
token ids, with the same is_greedy; every generate_until answer equals LLM's greedy output
under the task's stop strings; the metrics lm-eval reports follow from those numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serve_helpers import start_serve

from tokenmill import SamplingParams

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "tests" / "server" / "lm_eval_task"
MC, GEN, ROLLING = "tokenmill_mc", "tokenmill_gen", "tokenmill_rolling"
MAX_MODEL_LEN = 512  # the tiny model's max_position_embeddings
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (the test extra)"
)


@pytest.fixture(scope="module")
def serve_url(tiny_model_dir, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_API_KEY"}
    tmp = tmp_path_factory.mktemp("lm-eval-serve")
    proc, url = start_serve(tiny_model_dir, tmp, "--served-model-name", "tiny", env=env)
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class LmEvalRun:
    """One `lm_eval` subprocess, run from the repository root (the tasks' data_files are
    relative to it) and offline."""

    proc: subprocess.Popen
    out: Path
    log_path: Path
    tasks: list[str]
    started: float

    def finish(self) -> tuple[dict, dict[str, list[dict]], str]:
        """Wait for it; (results json, {task: logged samples in doc order}, its log)."""
        rc = self.proc.wait(300)
        log = self.log_path.read_text()
        assert rc == 0, log
        print(f"lm_eval {self.tasks}: {time.monotonic() - self.started:.1f}s")
        (results_file,) = self.out.rglob("results_*.json")
        samples = {}
        for task in self.tasks:
            (samples_file,) = self.out.rglob(f"samples_{task}_*.jsonl")
            rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
            samples[task] = sorted(rows, key=lambda r: r["doc_id"])
        return json.loads(results_file.read_text()), samples, log


def start_lm_eval(tmp: Path, model: str, model_args: dict, tasks: list[str], *extra: str):
    cmd = [
        *(sys.executable, "-m", "lm_eval", "--model", model),
        *("--model_args", ",".join(f"{k}={v}" for k, v in model_args.items())),
        *("--include_path", str(TASK_DIR), "--tasks", *tasks),
        *("--output_path", str(tmp / "out"), "--log_samples", *extra),
    ]
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf-home"),  # the datasets cache, away from ~/.cache
        "OPENAI_API_KEY": "unused",
    }
    log_path = tmp / "lm_eval.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return LmEvalRun(proc, tmp / "out", log_path, tasks, time.monotonic())


@pytest.fixture(scope="module")
def lm_eval_runs(serve_url, tiny_model_dir, tmp_path_factory):
    """The three lm_eval runs of this module, started at once: each spends most of its ~10 s
    importing torch, transformers and datasets, and only a second or two on requests."""
    completions = serve_url + "/v1/completions"
    specs = {
        # Tokenizing locally, four requests in flight at once.
        "completions": (
            "local-completions",
            {
                "model": "tiny",
                "base_url": completions,
                "tokenizer_backend": "huggingface",
                "tokenizer": tiny_model_dir,
                "num_concurrent": 4,
                "max_length": MAX_MODEL_LEN,
            },
            [MC, GEN, ROLLING],
        ),
        # No tokenizer named: lm-eval's default backend picks the server's own (/tokenizer_info,
        # /tokenize, /detokenize); four prompts in each request.
        "remote_tokenizer": (
            "local-completions",
            {"model": "tiny", "base_url": completions, "max_length": MAX_MODEL_LEN},
            [MC],
            "--batch_size",
            "4",
        ),
        # The chat path: --apply_chat_template sends each prompt as one user message.
        "chat": (
            "local-chat-completions",
            {"model": "tiny", "base_url": serve_url + "/v1/chat/completions", "num_concurrent": 2},
            [GEN],
            "--apply_chat_template",
        ),
    }
    runs = {}
    for name, (model, model_args, tasks, *extra) in specs.items():
        model_args = {**model_args, "max_retries": 1}
        runs[name] = start_lm_eval(tmp_path_factory.mktemp(name), model, model_args, tasks, *extra)
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(10)


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The token ids lm-eval sends for a (context, continuation) pair: trailing spaces move to
    the continuation, the whole is encoded once and split where the context's encoding ends."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    num_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    return whole[:num_context], whole[num_context:]


def engine_loglikelihoods(
    llm, split: list[tuple[list[int], list[int]]]
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the sum of the continuation's logprobs and
    whether every continuation token is the argmax, straight from the engine's prompt logprobs."""
    outs = llm.generate(
        [ctx + cont for ctx, cont in split],
        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0),
        use_tqdm=False,
    )
    results = []
    for (ctx, cont), out in zip(split, outs):
        ids = ctx + cont
        entries = [out.prompt_logprobs[i][ids[i]] for i in range(len(ctx), len(ids))]
        results.append((sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)))
    return results


def check_multiple_choice(llm, results: dict, rows: list[dict]) -> None:
    pairs = [(args["arg_0"], args["arg_1"]) for row in rows for args in row["arguments"].values()]
    logged = [
        (float(ll), is_greedy == "True") for row in rows for [[ll, is_greedy]] in row["resps"]
    ]
    assert len(logged) == len(pairs) >= 12
    expected = engine_loglikelihoods(llm, [split_pair(llm.tokenizer, c, x) for c, x in pairs])
    for (ll, greedy), (want_ll, want_greedy), pair in zip(logged, expected, pairs):
        assert ll == pytest.approx(want_ll, rel=1e-6, abs=1e-4), pair
        assert greedy == want_greedy, pair
    # acc and acc_norm (loglikelihood per byte of the choice) follow from those numbers.
    acc, acc_norm, i = [], [], 0
    for row in rows:
        choices = [args["arg_1"] for args in row["arguments"].values()]
        lls = [ll for ll, _ in expected[i : i + len(choices)]]
        i += len(choices)
        norm = [ll / len(c.encode()) for ll, c in zip(lls, choices)]
        acc.append(lls.index(max(lls)) == row["doc"]["answer"])
        acc_norm.append(norm.index(max(norm)) == row["doc"]["answer"])
    metrics = results["results"][MC]
    assert metrics["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert metrics["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def rolling_windows(token_ids: list[int], bos: int, max_seq_len: int):
    """lm-eval's loglikelihood_rolling windows (get_rolling_token_windows, then
    make_disjoint_window, context_len 1): (context ids, continuation ids) pairs that score every
    token once, each after up to max_seq_len tokens (the first window after BOS)."""
    first = min(max_seq_len, len(token_ids))
    windows = [([bos], token_ids[:first])]
    predicted = first
    while predicted < len(token_ids):
        n = min(len(token_ids) - predicted, max_seq_len)
        end = predicted + n
        windows.append((token_ids[end - max_seq_len - 1 : end - n], token_ids[end - n : end]))
        predicted = end
    return windows


def check_rolling(llm, results: dict, rows: list[dict], max_length: int) -> None:
    """lm-eval sends at most max_length - 1 tokens (the generated one makes max_length); a
    rolling window scores max_length - 2 tokens after one token of context. With max_length the
    server's max_model_len, the long text's windows fill the server's context exactly."""
    tok = llm.tokenizer
    texts = [row["doc"]["text"] for row in rows]
    windows = [
        rolling_windows(
            tok(t, add_special_tokens=False).input_ids, tok.bos_token_id, max_length - 2
        )
        for t in texts
    ]
    assert max(len(w) for w in windows) >= 3
    assert max(len(c) + len(x) for w in windows for c, x in w) == max_length - 1
    scores = engine_loglikelihoods(llm, [pair for w in windows for pair in w])
    expected, i = [], 0
    for w in windows:
        expected.append(sum(ll for ll, _ in scores[i : i + len(w)]))
        i += len(w)
    for row, want in zip(rows, expected):
        assert float(row["resps"][0][0]) == pytest.approx(want, rel=1e-6, abs=1e-4)
    num_bytes = sum(len(t.encode()) for t in texts)
    assert results["results"][ROLLING]["byte_perplexity,none"] == pytest.approx(
        math.exp(-sum(expected) / num_bytes), rel=1e-4
    )


def check_generations(results: dict, rows: list[dict], expected) -> None:
    """expected: (prompt, gen kwargs) -> the engine's CompletionOutput."""
    stopped_on_string = 0
    for row in rows:
        args = row["arguments"]["gen_args_0"]
        out = expected(args["arg_0"], args["arg_1"])
        assert row["resps"] == [[out.text]], row["doc"]
        stopped_on_string += (
            out.finish_reason == "stop" and out.stop_reason in args["arg_1"]["until"]
        )
    # Else the stop strings were never put to the test; pick ones the tiny model writes.
    assert stopped_on_string >= 1
    hits = [row["resps"][0][0] == row["target"] for row in rows]
    assert results["results"][GEN]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))


def greedy(kwargs: dict) -> SamplingParams:
    assert kwargs["temperature"] == 0 and not kwargs["do_sample"]
    return SamplingParams(temperature=0, max_tokens=kwargs["max_gen_toks"], stop=kwargs["until"])


@needs_lm_eval
def test_lm_eval_local_completions(lm_eval_runs, reference_llm):
    results, samples, _ = lm_eval_runs["completions"].finish()
    assert set(results["results"]) == {MC, GEN, ROLLING}
    check_multiple_choice(reference_llm, results, samples[MC])
    check_rolling(reference_llm, results, samples[ROLLING], MAX_MODEL_LEN)

    tok = reference_llm.tokenizer

    def expected(prompt, kwargs):
        ids = tok(prompt, add_special_tokens=False).input_ids  # as lm-eval sends them
        return reference_llm.generate(ids, greedy(kwargs), use_tqdm=False)[0].outputs[0]

    check_generations(results, samples[GEN], expected)


@needs_lm_eval
def test_lm_eval_remote_tokenizer_batched(lm_eval_runs, reference_llm):
    results, samples, log = lm_eval_runs["remote_tokenizer"].finish()
    assert "Using tokenizer remote" in log
    check_multiple_choice(reference_llm, results, samples[MC])


@needs_lm_eval
def test_lm_eval_local_chat_completions(lm_eval_runs, reference_llm):
    results, samples, _ = lm_eval_runs["chat"].finish()

    def expected(messages_json, kwargs):
        (messages,) = messages_json  # lm-eval logs the conversation as one JSON string
        messages = json.loads(messages)
        assert messages[-1]["role"] == "user"
        return reference_llm.chat(messages, greedy(kwargs), use_tqdm=False)[0].outputs[0]

    check_generations(results, samples[GEN], expected)


def test_echo_logprobs_mark_greedy_tokens_the_way_lm_eval_reads_them(server, reference_llm):
    """lm-eval's is_greedy: a continuation token is greedy when its logprob equals the largest of
    its top_logprobs, compared exactly. The tiny model never picks the tasks' answers, so this
    is where a True is checked."""
    ids = reference_llm.encode("The quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=6)
    greedy_ids = reference_llm.generate(ids, params, use_tqdm=False)[0].outputs[0].token_ids
    other = 3 if greedy_ids[0] != 3 else 4
    body = {
        "model": server.model,
        "prompt": [ids + greedy_ids, ids + [other] + greedy_ids[1:]],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 1,
        "echo": True,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    resp = httpx.post(server.base_url + "/completions", json=body, headers=headers, timeout=60)
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    n = len(ids)
    lp = choices[0]["logprobs"]
    pairs = list(zip(lp["token_logprobs"][n:-1], lp["top_logprobs"][n:-1]))
    assert len(pairs) == len(greedy_ids)
    assert all(token == max(top.values()) for token, top in pairs)
    lp = choices[1]["logprobs"]
    assert lp["token_logprobs"][n] < max(lp["top_logprobs"][n].values())


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_logprobs_tokens_spell_the_prompt(server, reference_llm, as_ids):
    """The first prompt token has no logprob, but OpenAI still sends its text: harnesses that
    find the continuation by characters (text_offset) need the echoed tokens to spell the
    prompt and the offsets to add up. (It was "token_id:N", which shifted every offset.)"""
    prompt = "The quick brown fox"
    ids = reference_llm.encode(prompt)
    body = {
        "model": server.model,
        "prompt": ids if as_ids else prompt,
        "max_tokens": 2,
        "temperature": 0,
        "logprobs": 1,
        "echo": True,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    resp = httpx.post(server.base_url + "/completions", json=body, headers=headers, timeout=60)
    lp = resp.json()["choices"][0]["logprobs"]
    assert lp["tokens"][0] == reference_llm.tokenizer.decode(ids[:1])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][: len(ids)]) == prompt
    lengths = [len(t) for t in lp["tokens"]]
    assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
