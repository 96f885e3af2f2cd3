"""Engine: the public Python API (generate, chat, stream) over one background device loop.

    engine = Engine.from_pretrained("smollm2-135m-instruct", max_seqs=8)
    [out] = engine.generate(["The capital of France is"], SamplingParams(temperature=0))
    print(out.text)

Every method is thread-safe: requests from any thread (or event loop) queue into the
one scheduler loop, which batches them into the same compiled decode step.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import samplers
from checkpoints import registry
from engine import cpu_kernels
from engine.admission import MAX_TOP_LOGPROBS, Limits
from engine.config import ModelConfig
from engine.decode_state import DecodeState
from engine.disk_cache import cache_root
from engine.fp8 import E4M3
from engine.handle import Handle
from engine.kv_cache import (
    CacheConfigError,
    default_budget,
    default_page_size,
    init_cache,
    kv_dtype_named,
    pool_pages,
)
from engine.loading import LoadedModel, default_quantization, load_model
from engine.lockstep import Lockstep, agreed_budget, initialize
from engine.paging import parse_bytes
from engine.requests import ChoiceUpdate, Completion, GenerationRequest, InvalidRequest
from engine.scheduler import Scheduler, SchedulerSettings
from engine.sharded_pages import ShardedPages
from engine.sharding import cache_sharding, make_mesh, param_shardings, slot_shardings
from engine.step import Programs
from engine.tokenizer import Tokenizer
from engine.warmup import Later, warm_up

Prompt = str | Sequence[int]


def default_dtype() -> jnp.dtype:
    """float32 on CPU (XLA CPU's fast path), bfloat16 on TPU/GPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def enable_compilation_cache() -> None:
    """Persist compiled programs, so a second start compiles nothing new."""
    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        settings: SchedulerSettings,
        *,
        mesh: jax.sharding.Mesh | None = None,
        max_top_logprobs: int = 5,
        warmup: bool = True,
        background_compile: bool = True,
        page_size: int | None = None,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: jnp.dtype | None = None,
    ):
        """`warmup` compiles every program before the engine serves; with `background_compile`
        (not on a multi-process mesh: engine.lockstep) the full-width decode programs first,
        the narrower ones on a background thread, each used once it is ready. The KV cache is
        a pool of pages of `page_size` tokens (default: the backend's) in `kv_cache_memory`
        bytes (default: kv_cache.default_budget, the smallest of the processes'), never more
        than max_slots sequences of max_len fill, in `kv_cache_dtype` (default: the model's
        compute dtype)."""
        self.name = model.name
        self.config: ModelConfig = model.config
        self.tokenizer: Tokenizer = model.tokenizer
        self.generation_config = model.generation_config
        self.vocab_size = model.config.vocab_size
        self.max_context = min(settings.max_len, model.config.max_position_embeddings)
        if not 0 <= max_top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"max_top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}: {max_top_logprobs}"
            )
        self.max_top_logprobs = max_top_logprobs
        self.limits = Limits(
            vocab_size=self.vocab_size,
            context_window=self.max_context,
            max_top_logprobs=max_top_logprobs,
            max_logit_bias=settings.max_bias,
        )
        self.mesh = mesh or make_mesh()
        # Every data shard owns as many slots (engine.data_parallel): at least one each.
        shards = self.mesh.shape["data"]
        slots = -(-settings.max_slots // shards) * shards
        settings = dataclasses.replace(settings, max_slots=slots, min_slot_bucket=shards)
        dtype = model.dtype
        kv_dtype = kv_dtype_named(kv_cache_dtype or dtype)
        if model.packed and kv_dtype == E4M3:
            raise CacheConfigError("the CPU kernels read no fp8 KV cache: load with packed=False")
        page_size = page_size or default_page_size()
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1: {page_size}")
        num_pages = pool_pages(
            model.config,
            kv_dtype.itemsize,
            page_size,
            agreed_budget(kv_cache_memory if kv_cache_memory is not None else default_budget()),
            settings.max_slots,
            settings.max_len,
            multiple=shards,
        )
        pages_per_seq = -(-settings.max_len // page_size)
        # Made where it lives, page shards on their devices (a cache made whole and then
        # moved would first fill one device).
        make_cache = lambda: init_cache(model.config, num_pages, page_size, kv_dtype)  # noqa: E731
        cache_shardings = jax.tree.map(
            lambda x: cache_sharding(self.mesh, x.shape), jax.eval_shape(make_cache)
        )
        cache = jax.jit(make_cache, out_shardings=cache_shardings)()
        no_pages = np.zeros((settings.max_slots, pages_per_seq), np.int32)
        empty_state = jax.eval_shape(
            lambda: DecodeState.empty(no_pages, self.vocab_size, settings.max_bias)
        )
        self.programs = Programs(
            model.config,
            dtype,
            max(1, max_top_logprobs),
            sorted(self.tokenizer.eos_token_ids),
            pages_per_seq=pages_per_seq,
            packed=model.packed,
            cache_shardings=cache_shardings,
            state_shardings=slot_shardings(empty_state, self.mesh),
        )
        self.scheduler = Scheduler(
            self.programs,
            model.params,
            cache,
            ShardedPages(num_pages, page_size, shards, namespace=self.name),
            self.tokenizer,
            settings,
            self.limits,
            Lockstep(self.mesh) if jax.process_count() > 1 else None,
        )
        self._closing = threading.Event()
        self._compiler: threading.Thread | None = None
        self._later: Later | None = None  # what warm-up left to compile
        if warmup:
            self.warmup(background=background_compile and self.scheduler.lockstep is None)
        self.scheduler.start()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = registry.DEFAULT_MODEL,
        *,
        mesh: jax.sharding.Mesh | None = None,
        max_seqs: int | None = None,
        max_len: int | None = None,
        kv_cache_memory: int | str | None = None,
        page_size: int | None = None,
        kv_cache_dtype: str | jnp.dtype | None = None,
        dtype: jnp.dtype | None = None,
        decode_steps: int = 8,
        stream_rows: int = 8,
        max_queue: int = 256,
        prefill_budget: int = 4096,
        max_num_batched_tokens: int = 512,
        max_top_logprobs: int = 5,
        warmup: bool = True,
        background_compile: bool = True,
        distributed: bool = False,
        cpu_kernel: bool | None = None,
        max_slots: int | None = None,
        quantize: str | None = None,
    ) -> Engine:
        """Load a registered model name, HF folder, .gguf file or converted checkpoint.

        A decode call runs `decode_steps` steps per host sync (fewer where every live
        sequence reaches max_tokens sooner; on the CPU at most 4 while a request streams), or
        one step while a streamed request (stream=True; Engine.stream) decodes and the live
        sequences fit `stream_rows` rows, so its tokens arrive one by one (0: never).
        `prefill_budget` bounds the prompt tokens prefilled between two decode calls: a
        burst of new requests stalls running ones at most that long. The default admits a
        burst whole (prefill first, as vLLM schedules), so decoding runs on full batches: at
        32 clients, a 512-token budget left a sixth of the slots idle on average and cost
        15% of the throughput; lower it for smoother streams. A prompt longer than
        `max_num_batched_tokens` (the tokens of one model call) is prefilled in chunks,
        each riding in the first step of the running sequences' decode call, the chunk
        taking the budget their rows leave (so a long document no longer freezes every
        stream for its whole prefill). `max_seqs` (alias `max_slots`, default
        16; rounded up to a multiple of the mesh's data shards, which own as many each)
        bounds the sequences decoded together, `max_len` (default: the model's context
        length) each one's tokens; the KV cache takes `kv_cache_memory` bytes (or "4GiB";
        default kv_cache.default_budget) in pages of `page_size` tokens, stored as
        `kv_cache_dtype` (default: the compute dtype; bfloat16 or float16 halve a float32
        cache, and the bytes each decode step reads from it; "fp8" quarters it). `distributed=True`
        starts jax.distributed (engine.lockstep: every process runs it). `cpu_kernel` runs decode
        through engine.cpu_kernels (weights packed in the fewest bytes that hold them); None
        uses them wherever they apply: float32 on one CPU device that can build them, a float
        KV cache (they read no fp8 pages: an fp8 cache, for accelerators, runs XLA's ops).
        `quantize` ("int8", "fp8" or "none"; engine.quantize) keeps XLA's layer matrices in
        one byte a weight; by default a GGUF file's 4- and 8-bit matrices load as int8 off
        the CPU (on the CPU its kernels keep them packed)."""
        if distributed and not jax.distributed.is_initialized():
            initialize()
        enable_compilation_cache()
        mesh = mesh or make_mesh()
        dtype = jnp.dtype(dtype or default_dtype())
        kv_dtype = kv_dtype_named(kv_cache_dtype or dtype)
        if quantize is None:
            quantize = default_quantization(name_or_path, mesh)
        quantize = None if quantize == "none" else quantize
        usable = (
            mesh.size == 1
            and jnp.dtype(dtype) == jnp.float32
            and not quantize
            and kv_dtype != E4M3
            and cpu_kernels.available()
        )
        if cpu_kernel and not usable:
            raise ValueError(
                "cpu_kernel=True needs unquantized float32 weights, a float KV cache, one CPU "
                "device, AVX2, FMA, F16C and a C++ compiler (see the log for what was missing)"
            )
        cpu_kernel = usable if cpu_kernel is None else cpu_kernel
        model = load_model(
            name_or_path,
            dtype=dtype,
            shardings=lambda abstract: param_shardings(abstract, mesh),
            packed=cpu_kernel,
            quantize=quantize,
        )
        if max_seqs is not None and max_slots is not None and max_seqs != max_slots:
            raise ValueError(f"max_seqs={max_seqs} and its alias max_slots={max_slots} differ")
        if isinstance(kv_cache_memory, str):
            kv_cache_memory = parse_bytes(kv_cache_memory)
        max_len = max_len or model.config.max_position_embeddings
        model = dataclasses.replace(model, config=model.config.for_context(max_len))
        settings = SchedulerSettings(
            max_slots=max_seqs or max_slots or 16,
            max_len=max_len,
            decode_steps=decode_steps,
            stream_rows=stream_rows,
            max_queue=max_queue,
            prefill_budget=prefill_budget,
            max_num_batched_tokens=max_num_batched_tokens,
        )
        return cls(
            model,
            settings,
            mesh=mesh,
            max_top_logprobs=max_top_logprobs,
            warmup=warmup,
            background_compile=background_compile,
            page_size=page_size,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_dtype,
        )

    # ---- requests ---------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request; iterate the handle (sync or async) for its ChoiceUpdates.
        Raises InvalidRequest / ContextLengthExceeded (naming the field) for a request this
        engine cannot honour, EngineOverloaded when the queue is full."""
        return self.scheduler.submit(request)

    def stats(self) -> dict[str, int]:
        pending = self._later.pending if self._later is not None else 0
        return {**self.scheduler.stats(), "programs_pending": pending}

    def encode(self, prompt: Prompt) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: samplers.SamplingParams | None = None,
        **request: Any,
    ) -> list[Completion]:
        """Complete each prompt (text or token ids); returns n completions per prompt,
        prompt-major. `request` takes GenerationRequest's other fields (n, max_tokens, stop,
        ignore_eos, top_logprobs, ...)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or samplers.SamplingParams()
        handles = [
            self.submit(GenerationRequest(self.encode(p), params, **request)) for p in prompts
        ]
        return [c for h in handles for c in self._collect(h, iter(h))]

    def chat(
        self,
        messages: list[dict],
        params: samplers.SamplingParams | None = None,
        **request: Any,
    ) -> list[Completion]:
        """One chat turn through the model's own template; n completions."""
        try:
            ids = tuple(self.tokenizer.encode_chat(messages))
        except Exception as e:  # noqa: BLE001 - a template raises whatever its author wrote
            raise InvalidRequest("messages", f"could not apply the chat template: {e}") from e
        handle = self.submit(GenerationRequest(ids, params or samplers.SamplingParams(), **request))
        return self._collect(handle, iter(handle))

    async def stream(
        self, prompt: Prompt, params: samplers.SamplingParams | None = None, **request: Any
    ) -> AsyncIterator[ChoiceUpdate]:
        """Token events as they are generated; leaving the loop early cancels the request."""
        request.setdefault("stream", True)
        handle = self.submit(
            GenerationRequest(self.encode(prompt), params or samplers.SamplingParams(), **request)
        )
        try:
            async for update in handle:
                yield update
        finally:
            handle.cancel()

    def _collect(self, handle: Handle, updates) -> list[Completion]:
        n = handle.request.n
        text, ids, logprobs = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        reasons: list[str] = [""] * n
        for u in updates:
            text[u.index] += u.text
            ids[u.index] += u.token_ids
            logprobs[u.index] += u.logprobs or ()
            reasons[u.index] = u.finish_reason or reasons[u.index]
        want_lp = handle.request.top_logprobs is not None
        return [
            Completion(
                index=i,
                text=text[i],
                token_ids=tuple(ids[i]),
                raw_text=self.tokenizer.decode(ids[i], skip_special_tokens=False),
                finish_reason=reasons[i],
                logprobs=tuple(logprobs[i]) if want_lp else None,
                prompt_tokens=handle.prompt_tokens,
                timing=handle.timing,
            )
            for i in range(n)
        ]

    # ---- lifecycle --------------------------------------------------------------
    def warmup(self, background: bool = False) -> None:
        """Compile what serving uses before the first request (engine.warmup); with
        `background`, the rest on a thread."""
        self._later = warm_up(self.scheduler, self.vocab_size, self._closing)
        if background:
            self._compiler = threading.Thread(target=self._later.run, name="jaxfire-compile")
            self._compiler.start()
        else:
            self._later.quiet_s = 0.0  # compile it all now
            self._later.run()

    def close(self) -> None:
        self._closing.set()
        if self._compiler is not None:
            self._compiler.join()  # at most one compilation; XLA can't be interrupted
        self.scheduler.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
