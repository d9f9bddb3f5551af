"""One row's content never ends the job: every place it can raise (parser, tokenizer, chat
template, engine, formatting and writing) turns it into an error row, and the job goes on."""

from __future__ import annotations

import json

from io_fakes import FakeEngine, WordTokenizer
from test_io_job import rows_of, run

from tokenmill.io import exit_codes
from tokenmill.io.report import report_path


class PickyTokenizer(WordTokenizer):
    """Refuses any text holding the word 'poison' (the whole batch call fails, as a fast
    tokenizer's does on one bad input)."""

    def __call__(self, texts):
        batch = [texts] if isinstance(texts, str) else texts
        if any("poison" in t.split() for t in batch):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return super().__call__(texts)


class PickyEngine(FakeEngine):
    """Its chat template fails on role 'tool'; add_request fails on a prompt holding 'crash';
    its text for a prompt holding 'split' ends in half a surrogate pair."""

    def __init__(self):
        super().__init__()
        self.tokenizer = PickyTokenizer()

    def encode_chat(self, messages, add_generation_prompt=True, **template_kwargs):
        if any(m["role"] == "tool" for m in messages):
            raise KeyError("the chat template has no 'tool' role")
        return super().encode_chat(messages)

    def add_request(self, request_id, prompt, params=None, stream=True):
        if self.tokenizer("crash")["input_ids"][0] in prompt:
            raise TypeError("'NoneType' object is not subscriptable")
        super().add_request(request_id, prompt, params, stream)

    def step(self):
        outs = super().step()
        split = self.tokenizer("split")["input_ids"][0]
        for out in outs:
            if split in out.prompt_token_ids:
                out.outputs[0].text += "\udc80"
        return outs


def test_each_way_one_row_can_fail_is_an_error_row_and_the_job_goes_on(tmp_path):
    lines = [
        {"id": "fine", "prompt": "a fine row"},
        {"id": "tok", "prompt": "a poison row"},
        {"id": "chat", "messages": [{"role": "tool", "content": "x"}]},
        {"id": "engine", "prompt": "please crash now"},
        {"id": "text", "prompt": "split me"},
        {"id": "lone", "prompt": "abc \ud800"},
        {"id": "last", "prompt": "the last fine row"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for suffix in (".jsonl", ".parquet"):
        out = tmp_path / f"out{suffix}"
        code, _ = run(tmp_path, inp, engine=PickyEngine(), output=out)
        assert code == exit_codes.ROW_ERRORS
        rows = rows_of(out)
        assert [r["id"] for r in rows] == [line["id"] for line in lines]
        errors = [
            (json.loads(r["error"]) if isinstance(r["error"], str) else r["error"]) for r in rows
        ]
        types = [e and e["type"] for e in errors]
        assert types == [
            None,
            "tokenize_error",
            "tokenize_error",
            "rejected",
            "invalid_text",
            "invalid_text",
            None,
        ]
        assert "TextEncodeInput" in errors[1]["message"]
        assert "'tool' role" in errors[2]["message"]
        assert "row.text holds a lone surrogate" in errors[4]["message"]
        assert "prompt holds a lone surrogate" in errors[5]["message"]
        report = json.loads(report_path(out).read_text())
        assert report["rows"]["ok"] == 2 and report["rows"]["failed"] == 5


def test_a_result_that_cannot_be_formatted_is_an_error_row(tmp_path, monkeypatch):
    from tokenmill.io import job

    real = job.format_result

    def format_result(result, model):
        if result.ok and result.row.id == "odd":
            raise KeyError("finish_reasons")
        return real(result, model)

    monkeypatch.setattr(job, "format_result", format_result)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "odd", "prompt": "y"}\n{"prompt": "z"}\n')
    assert run(tmp_path, inp)[0] == exit_codes.ROW_ERRORS
    rows = rows_of(tmp_path / "out.jsonl")
    assert [r["error"] and r["error"]["type"] for r in rows] == [None, "invalid_row", None]
    assert "cannot format the result" in rows[1]["error"]["message"]
