"""The model runner: SchedulerOutput -> one varlen forward pass -> sampled tokens.

It owns the model weights, the paged KV cache and the attention metadata; the scheduler never
sees a tensor. Flattening, for seqs scheduled with (start_pos, num_new) = (8, 1), (3, 4), (0, 5)
and block_size 4, block tables [[0, 5, 2], [1], [3, 4]]:

    input_ids     = [d, c0 c1 c2 c3, p0 p1 p2 p3 p4]
    positions     = [8, 3 4 5 6,     0 1 2 3 4]
    cu_seqlens_q  = [0, 1, 5, 10]          seq_lens = [9, 7, 5]      num_decodes = 1
    slot_mapping  = [2*4+0, 1*4+3, 5*4+0 ...]   (block_ids[pos // 4] * 4 + pos % 4)
    logits_indices = [0, 4, 9]              (last token of each seq that samples)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from tokenmill.engine.attention import AttentionMetadata, get_attention_backend, set_forward_context
from tokenmill.engine.block_rows import BlockRows, block_table
from tokenmill.engine.config import MIN_KV_TOKENS_PER_SEQ, EngineConfig
from tokenmill.engine.dummy_weights import init_dummy_weights
from tokenmill.engine.gpu_memory import MemoryFacts, kv_cache_budget
from tokenmill.engine.loader import load_weights
from tokenmill.engine.models.ops import ModelOps
from tokenmill.engine.models.registry import model_class
from tokenmill.engine.outputs import Logprob
from tokenmill.engine.parallel import TensorParallel, kv_head_split
from tokenmill.engine.prompt_logprobs import (
    PendingPromptLogprobs,
    collect_prompt_logprobs,
    launch_prompt_logprobs,
)
from tokenmill.engine.request import PLACEHOLDER
from tokenmill.engine.sampler import Sampler, compute_logprobs
from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.engine.staging import Staging, cuda_index
from tokenmill.engine.structured_output import StructuredOutputManager

CPU_DEFAULT_KV_BYTES = 1 << 30

log = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    """Tokens sampled this step, keyed by request id (only seqs whose chunk reached the end)."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, dict[int, Logprob]] = field(default_factory=dict)


def _launches(method):
    """A runner method that launches kernels: Triton compiles inside it count as this
    runner's mid-run compiles (ModelRunner._launching)."""

    @functools.wraps(method)
    def launching(self, *args, **kwargs):
        with self._launching:
            return method(self, *args, **kwargs)

    return launching


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


class ModelRunner:
    """Runs the model on one device. Created by the engine after the config is resolved.

    Under tensor parallelism (`tp.size` > 1) one runner per rank holds that rank's shard of
    the weights and of the KV cache; every rank runs every step (engine/tp_worker.py), rank 0
    samples and broadcasts the tokens."""

    def __init__(
        self,
        config: EngineConfig,
        hf_config,
        model_dir,
        max_model_len: int,
        tp: TensorParallel | None = None,
        device: torch.device | None = None,
    ):
        self.hf_config = hf_config
        self.tp = tp = tp or TensorParallel()
        self.device = device or resolve_device(config.device)
        # a step's small int arrays go to the device in one copy per dtype (engine/staging.py)
        self._stage32 = Staging(self.device, torch.int32)
        self._stage64 = Staging(self.device, torch.int64)
        total_memory = (
            torch.cuda.get_device_properties(self.device).total_memory
            if self.device.type == "cuda"
            else None
        )
        self.config = config.with_card_defaults(self.device.type, total_memory)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        if config.seed is not None:
            torch.manual_seed(config.seed)

        self.backend = get_attention_backend(self._backend_name(), self.device)
        # the layer kernels too (fused norms, rotary + KV write, ...): on CUDA, and on CPU
        # under the Triton interpreter, where the tests run them inside the engine
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        use_triton = self.backend.name == "triton" and (self.device.type == "cuda" or interpreting)
        ops = ModelOps.triton(tp) if use_triton else ModelOps(tp=tp)
        cls = model_class(hf_config)
        prev_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = cls(hf_config, self.backend, max_position=max_model_len + 1, ops=ops)
        finally:
            torch.set_default_dtype(prev_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        elif model_dir is not None:
            load_weights(self.model, model_dir)
        self.model.eval()
        self.sampler = Sampler(use_triton=use_triton)
        self.num_blocks = self._allocate_kv_cache()
        if config.max_num_seqs is None:
            self._cap_max_num_seqs_to_kv_cache()
        config = self.config
        self.structured = StructuredOutputManager(
            model_dir, hf_config.vocab_size, config.max_num_seqs, self.device
        )
        self._last_sampled = torch.empty(0, dtype=torch.long, device=self.device)
        self._last_rows: dict[str, int] = {}
        self._block_rows = BlockRows()  # block-table rows kept between steps
        self._cuda_index = cuda_index(self.device)
        # Whether a step may launch before the previous one's tokens are read back. Pointless
        # on CPU (torch runs synchronously there), but tests switch it on to check the logic.
        self.can_overlap = self.device.type == "cuda"
        # CUDA graphs (docs/cuda_graphs.md): whole-model graphs for decode-only steps, piecewise
        # graphs (attention eager between them) for any other step.
        self.graphs = self.piecewise = None
        self.num_graph_steps = self.num_eager_steps = 0
        if self.device.type == "cuda" and not config.enforce_eager and self.backend.name != "torch":
            from tokenmill.engine.cuda_graph import DecodeGraphs, PiecewiseGraphs

            self.graphs = DecodeGraphs(
                self.model,
                config.max_num_seqs,
                self.max_blocks_per_seq,
                max_model_len,
                self.output_width(),
                self.dtype,
                self.device,
            )
            self.piecewise = PiecewiseGraphs(
                self.model,
                config.max_num_batched_tokens,
                self.output_width(),
                self.dtype,
                self.device,
                pool=self.graphs.pool,
            )
        self._compiles = None  # Triton compiles after the warm-up (kernels/jit_watch.py)
        # Counts only inside this runner's launches: another engine in the process (a test
        # suite's, a benchmark's) compiles its own variants, which are not this one's misses.
        self._launching = contextlib.nullcontext()
        if self.device.type == "cuda" and self.backend.name == "triton":
            self.warm_up_kernels()
            from tokenmill.kernels.jit_watch import CompileCounter

            self._compiles = CompileCounter(_warn_mid_run_compile, gated=True)
            self._launching = self._compiles

    @property
    def num_kernel_compiles(self) -> int:
        """Triton compiles since the start-up warm-up: each one stalled a step."""
        return 0 if self._compiles is None else self._compiles.count

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Compile now the Triton kernel variants that steps would otherwise compile mid-run.

        Per-step ints and offsets are left unspecialized (kernels/specialize.py), but a
        kernel still compiles once per tile configuration: the varlen attention's BLOCK_M
        grows with the step's longest chunk, and a top-p or top-k batch takes other sampling
        kernels than a plain one. Seen on an H200: 41% of a first-process timed pass was spent
        compiling those (benchmarks/RESULTS.md, fourth session); a server's first requests
        would wait for the same compiles. One eager forward per chunk class (a decode row
        plus a chunk of 1, 2, 4, .. 64 tokens, reading zeroed cache blocks, writing nothing),
        the layers that pick tiles of their own by batch size (MoE: `warm_up_kernels` on the
        module), then one draw per sampling filter combination and one grammar-mask launch on
        dummy logits."""
        n_max = min(self.config.max_num_batched_tokens, self.max_model_len) - 1
        bs, logits = self.block_size, None
        for chunk in (1, 2, 4, 8, 16, 32, 64):
            if chunk > n_max or -(-chunk // bs) > self.num_blocks:
                break
            n = 1 + chunk
            blocks = list(range(-(-chunk // bs)))
            meta = self._metadata(
                [0, 1, n], [1, chunk], [blocks[:1], blocks], [-1] * n, chunk, chunk, 1
            )
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            pos = torch.tensor([0, *range(chunk)], dtype=torch.long, device=self.device)
            with set_forward_context(meta):
                hidden = self.model(ids, pos)
            logits = self.model.compute_logits(hidden[-2:]).float()  # [2, vocab_size]
        for module in self.model.modules():  # layers with tile choices of their own (MoE)
            warm_up = getattr(module, "warm_up_kernels", None)
            if warm_up is not None and module is not self.model:
                warm_up()
        if logits is not None and logits.is_cuda:
            self.sampler.warm_up(logits)
            self.structured.warm_up(logits)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def output_width(self) -> int:
        """Width of the hidden states the model returns: the LM head's input. Not always
        hidden_size: OPT projects them out to word_embed_proj_dim (the graphs' output buffers
        sized by hidden_size broke every OPT-350m-shaped model on the GPU)."""
        m = self.model
        head = getattr(m, "lm_head", None)
        return (m.model.embed_tokens.weight if head is None else head.weight).shape[1]

    def _backend_name(self) -> str:
        """The configured backend; `auto` falls back to torch where the kernels don't fit."""
        name = self.config.attention_backend
        if name != "auto":
            return name
        if self.device.type != "cuda":
            return "torch"
        head_dim = self._kv_geometry()[2]
        if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
            return "torch"  # NOTE: the Triton kernels take power-of-two head sizes 16..256
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"

    # ---- KV cache ------------------------------------------------------------------------------
    def _kv_geometry(self) -> tuple[int, int, int]:
        """(layers, this rank's kv heads, head_dim) of the KV cache."""
        c = self.hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads  # MHA: OPT
        return c.num_hidden_layers, kv_head_split(kv_heads, self.tp)[1], head_dim

    def block_bytes(self) -> int:
        layers, kv_heads, head_dim = self._kv_geometry()
        return 2 * layers * self.block_size * kv_heads * head_dim * self.dtype.itemsize

    def _allocate_kv_cache(self) -> int:
        layers, kv_heads, head_dim = self._kv_geometry()
        budget = self.config.kv_cache_bytes
        if budget is None:
            budget = self._gpu_kv_budget() if self.device.type == "cuda" else CPU_DEFAULT_KV_BYTES
        num_blocks = budget // self.block_bytes()
        # More blocks than max_num_seqs full-length sequences can never be used.
        num_blocks = min(num_blocks, self.config.max_num_seqs * self.max_blocks_per_seq)
        num_blocks = self.tp.min(num_blocks)  # one block table for all ranks
        if num_blocks < self.max_blocks_per_seq:
            need = self.max_blocks_per_seq * self.block_bytes()
            if num_blocks < 1:
                raise ValueError(
                    f"the KV cache budget ({budget} bytes) holds no block of {self.block_bytes()} "
                    f"bytes; raise --kv-cache-memory or --gpu-memory-utilization (one full-length "
                    f"sequence needs {need} bytes)"
                )
        self.kv_cache = torch.zeros(
            layers,
            2,
            num_blocks,
            self.block_size,
            kv_heads,
            head_dim,
            dtype=self.dtype,
            device=self.device,
        )  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.kv_cache[i, 0]
            layer.self_attn.v_cache = self.kv_cache[i, 1]
        return num_blocks

    def _cap_max_num_seqs_to_kv_cache(self) -> None:
        """An automatic max_num_seqs gives each slot MIN_KV_TOKENS_PER_SEQ tokens of cache (or
        the context, if shorter): more slots than the cache holds would only preempt."""
        if self.device.type != "cuda":
            return  # the CPU keeps its small fixed defaults
        per_seq = min(MIN_KV_TOKENS_PER_SEQ, self.max_model_len)
        cap = max(1, self.num_blocks * self.block_size // per_seq)
        if cap < self.config.max_num_seqs:
            self.config = replace(self.config, max_num_seqs=cap)

    def _gpu_kv_budget(self) -> int:
        """What gpu_memory_utilization leaves after weights and a full-budget forward pass
        (engine/gpu_memory.py has the rule)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.profile_run()
        torch.cuda.empty_cache()  # the profile's activations go back to the card
        free, total = torch.cuda.mem_get_info()
        facts = MemoryFacts(
            total=total,
            free=free,
            peak=torch.cuda.max_memory_allocated(),
            allocated=torch.cuda.memory_allocated(),
        )
        return kv_cache_budget(facts, self.config.gpu_memory_utilization, str(self.device))

    @torch.inference_mode()
    def profile_run(self) -> None:
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        for layer in self.model.model.layers:  # a throw-away cache of one sequence
            shape = (
                self.max_blocks_per_seq,
                self.block_size,
                layer.self_attn.num_kv_heads,
                layer.self_attn.head_dim,
            )
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = layer.self_attn.k_cache
        meta = self._metadata(
            [0, n], [n], [list(range(self.max_blocks_per_seq))], list(range(n)), n, n
        )
        with set_forward_context(meta):
            hidden = self.model(ids, pos)
        self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs) :])
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)
        torch.cuda.synchronize()

    # ---- one step ------------------------------------------------------------------------------
    def _metadata(
        self, cu_seqlens_q, seq_lens, block_tables, slot_mapping, max_q, max_k, num_decodes=0
    ) -> AttentionMetadata:
        """A step's AttentionMetadata on the device (see _step_inputs)."""
        return self._step_inputs(
            cu_seqlens_q, seq_lens, block_tables, slot_mapping, max_q, max_k, num_decodes
        )[0]

    def _step_inputs(
        self,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        slot_mapping,
        max_q,
        max_k,
        num_decodes=0,
        extra: tuple = (),
    ) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """The step's AttentionMetadata, plus `extra` int64 arrays (ids, positions, ...) on the
        device: one copy per dtype for all of them (engine/staging.py)."""
        if not isinstance(block_tables, np.ndarray):  # lists: warm-up, profile, capture
            block_tables = block_table(block_tables)
        cu, lens, table = self._stage32(cu_seqlens_q, seq_lens, block_tables)
        slots, *rest = self._stage64(slot_mapping, *extra)
        meta = AttentionMetadata(
            cu_seqlens_q=cu,
            seq_lens=lens,
            block_tables=table,
            slot_mapping=slots,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            cu_seqlens_q_cpu=list(cu_seqlens_q),
            seq_lens_cpu=list(seq_lens),
            num_decodes=num_decodes,
        )
        return meta, rest

    def prepare(self, sched: SchedulerOutput):
        """Flatten the scheduled slices into the varlen batch (see the module docstring)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu_seqlens_q = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        inflight_at: list[int] = []  # flat positions of PLACEHOLDER tokens
        inflight_rows: list[int] = []  # their rows in the previous step's sampled tensor
        long_rope_offset = getattr(self.model, "rope_long_offset", 0)
        last_rows = self._last_rows
        total = 0  # tokens so far (cu_seqlens_q[-1])
        max_q = 1
        num_decodes = -1  # the first row of more than one token; the scheduler lists one-token
        # rows first (decodes_first): count them, don't trust it
        # NOTE: runs over every row every step; on a small model this loop is part of the
        # step's host time, so a decode row (one token) takes the short branch.
        for i, seq in enumerate(sched.seqs):
            toks, start = seq.token_ids, seq.start_pos
            n = len(toks)
            blocks = seq.block_ids
            off = long_rope_offset if seq.req.long_rope else 0  # Phi-3 long rope (models/phi3.py)
            if n == 1:
                input_ids.append(toks[0])
                positions.append(start + off)
                slot_mapping.append(blocks[start // bs] * bs + start % bs)
            else:
                if num_decodes < 0:
                    num_decodes = i
                max_q = max(max_q, n)
                input_ids.extend(toks)
                positions.extend(range(start + off, start + n + off))
                pos, end = start, start + n
                while pos < end:  # a run of slots per block, not one Python step per token
                    slot = blocks[pos // bs] * bs + pos % bs
                    take = min(bs - pos % bs, end - pos)
                    slot_mapping.extend(range(slot, slot + take))
                    pos += take
            total += n
            if toks[-1] == PLACEHOLDER:
                inflight_at.append(total - 1)
                inflight_rows.append(last_rows[seq.req_id])
            cu_seqlens_q.append(total)
            seq_lens.append(start + n)
            if seq.sample:
                logits_indices.append(total - 1)
        if num_decodes < 0:
            num_decodes = len(sched.seqs)
        meta, (ids, pos, at, rows, logits_idx) = self._step_inputs(
            cu_seqlens_q, seq_lens, self._block_rows.table(sched.seqs), slot_mapping, max_q,
            max(seq_lens), num_decodes,
            extra=(input_ids, positions, inflight_at, inflight_rows, logits_indices),
        )  # fmt: skip
        if inflight_at:  # fill placeholders from the device-side samples of the last step
            ids[at] = self._last_sampled[rows]
        return ids, pos, meta, logits_idx

    def _to_device(self, values, dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.inference_mode()
    @_launches
    def execute_async(self, sched: SchedulerOutput, defer_sampling: bool = False) -> PendingStep:
        """Launch one step; nothing waits for the device. `collect` reads the result.

        With defer_sampling, only the forward pass and the logits are launched: the caller
        launches the sampling with `sample_async` once the host is ready for it (grammar masks
        need the previous step's tokens, which may land while this forward runs)."""
        ids, pos, meta, logits_idx = self.prepare(sched)
        if self.tp.rank == 0:
            self.structured.prefetch([s.req for s in sched.seqs])  # grammars compile meanwhile
        hidden = self._forward(ids, pos, meta)  # [num_tokens, hidden_size]
        pending = PendingStep(sched, [s for s in sched.seqs if s.sample])
        pending.prompt_logprobs = launch_prompt_logprobs(
            self.model, hidden, sched.seqs, self._to_device
        )
        if not pending.sampling:
            return pending
        # [num_samples, vocab_size]
        pending.logits_to_sample = self.model.compute_logits(hidden[logits_idx]).float()
        if not defer_sampling:
            self.sample_async(pending)
        return pending

    @torch.inference_mode()
    @_launches
    def sample_async(self, pending: PendingStep) -> None:
        """Launch the sampling of a launched forward (grammar masks first); no waiting.

        Must run before the next step is prepared: its placeholders read these tokens."""
        logits, pending.logits_to_sample = pending.logits_to_sample, None
        if logits is None:
            return  # nothing samples this step, or already sampled
        driver = self.tp.rank == 0
        reqs = [s.req for s in pending.sampling]
        if driver:
            self.structured.apply(logits, reqs)  # grammar masks, before other logits processing
            token_ids = self.sampler.sample(logits, reqs).long()  # [num_samples] on the device
        else:  # a tensor-parallel worker: rank 0 samples
            token_ids = torch.empty(len(reqs), dtype=torch.long, device=self.device)
        self.tp.broadcast(token_ids)  # rank 0's tokens: every rank fills the same placeholders
        self._last_sampled = token_ids
        self._last_rows = {s.req_id: i for i, s in enumerate(pending.sampling)}
        if not driver:
            return
        if any(r.params.logprobs is not None for r in reqs):
            pending.logits = logits
        pending.token_ids_gpu = token_ids
        if self.device.type == "cuda":
            pending.token_ids_cpu = torch.empty(len(reqs), dtype=torch.long, pin_memory=True)
            pending.token_ids_cpu.copy_(token_ids, non_blocking=True)
            pending.ready = torch.cuda.Event()
            pending.ready.record(torch.cuda.current_stream(self._cuda_index))
        else:
            pending.token_ids_cpu = token_ids

    def _forward(self, ids, pos, meta) -> torch.Tensor:  # [num_tokens, hidden_size]
        """The model over one step: replayed from CUDA graphs where captured, else eager."""
        graphs = self._graphs_for(meta, len(ids))
        if graphs is None:
            self.num_eager_steps += 1
            with set_forward_context(meta):
                return self.model(ids, pos)
        self.num_graph_steps += 1
        return graphs.run(ids, pos, meta)

    def _graphs_for(self, meta, num_tokens: int):
        """Decode-only steps: a whole-model graph; any other step: the piecewise graphs."""
        if self.graphs is not None and meta.is_decode_only and self.graphs.can_run(num_tokens):
            return self.graphs
        if self.piecewise is not None and self.piecewise.can_run(num_tokens):
            return self.piecewise
        return None

    def collect(self, pending: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step and return its sampled tokens (and logprobs)."""
        out = ModelRunnerOutput()
        if pending.prompt_logprobs is not None:
            collect_prompt_logprobs(pending.prompt_logprobs)  # .tolist() waits for the step
        if not pending.sampling:
            return out
        assert pending.logits_to_sample is None, "a deferred step was never sampled"
        if pending.ready is not None:
            pending.ready.synchronize()
        tokens = pending.token_ids_cpu.tolist()
        for seq, token in zip(pending.sampling, tokens):
            out.sampled[seq.req_id] = token
        if pending.logits is not None:
            reqs = [s.req for s in pending.sampling]
            lps = compute_logprobs(pending.logits, pending.token_ids_gpu, reqs)
            for seq, lp in zip(pending.sampling, lps):
                if lp is not None:
                    out.logprobs[seq.req_id] = lp
        return out

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.execute_async(sched))


@dataclass
class PendingStep:
    """A launched step whose sampled tokens may still be on their way from the device."""

    sched: SchedulerOutput
    sampling: list  # ScheduledSeq rows that sample, in logits order
    token_ids_gpu: torch.Tensor | None = None
    token_ids_cpu: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    logits: torch.Tensor | None = None  # kept only when logprobs were asked
    # [num_samples, vocab_size] float32: launched, not sampled yet (execute_async's
    # defer_sampling); sample_async takes it
    logits_to_sample: torch.Tensor | None = None
    prompt_logprobs: PendingPromptLogprobs | None = None


def _warn_mid_run_compile(name: str) -> None:
    log.warning(
        "Triton compiled %s mid-run: a kernel variant the start-up warm-up "
        "(ModelRunner.warm_up_kernels) missed; the step waited for it",
        name,
    )


def now() -> float:
    return time.monotonic()
