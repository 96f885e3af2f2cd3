"""Kernels for XLA CPU: a float32-accumulating matmul over packed weights, attention of one
query token against the paged cache in place, a whole decoder layer for one token per row, a
prompt's causal attention from its q/k/v projection (fresh, or extending a sequence in the
cache), the sampler's top_k and a tied model's token lookup from its packed LM head.

The cache is engine.kv_cache's page pool: per layer K and V each
[num_pages, kv_heads, page_size, head_dim] of float32, float16 or bfloat16 (read into float32
registers, written rounded to nearest even), a sequence's position p in page
pages[p // page_size] at offset p % page_size of its page-table row `pages`.

The C++ sources (`matmul.cc`, `attention.cc`, `decode_attention.cc`, `layer.cc`, `top_k.cc`,
`embed.cc`) are built on first use with the system's C++ compiler into the jaxfire cache folder
(engine.disk_cache) and registered as XLA FFI targets, for the widest instructions the CPU
runs (`isa()`: AVX-512 or AVX2; `$JAXFIRE_CPU_ISA` names one), the same bits either way.
Weights are packed once at load time (packing.py) into 16-column panels the matmul streams
contiguously, in the fewest bytes that hold exactly the same float32 values (`pack`): GGUF's
4- and 8-bit blocks as 4- or 8-bit codes with a scale and offset, bfloat16 checkpoints as
bfloat16.

`available()` says whether this machine can use them (x86-64 with AVX2, FMA and F16C, a C++
compiler, JAX on CPU); the model keeps XLA's ops where it cannot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from engine.cpu_kernels.packing import PANEL, QUANT_BLOCK, exact_blocks, pack  # noqa: F401
from engine.disk_cache import cache_root

MATMUL = "jaxfire_cpu_matmul"
ATTENTION = "jaxfire_cpu_decode_attention"
PREFILL_ATTENTION = "jaxfire_cpu_prefill_attention"
EXTEND_ATTENTION = "jaxfire_cpu_extend_attention"
DECODE_LAYER = "jaxfire_cpu_decode_layer"
TOP_K = "jaxfire_cpu_top_k"
EMBED = "jaxfire_cpu_embed"
_SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "matmul.cc",
        "attention.cc",
        "decode_attention.cc",
        "layer.cc",
        "top_k.cc",
        "embed.cc",
    )
]
_HEADERS = [
    Path(__file__).with_name(n)
    for n in (
        "parallel.h",
        "kernels.h",
        "kv_storage.h",
        "vector_math.h",
        "attention_math.h",
        "weight_formats.h",
        "lanes16.h",
    )
]
# The builds of the kernels, widest first, and their compiler flags: "-mX" needs the CPU flag
# X. AVX-512 computes a panel row in one 512-bit register (lanes16.h), AVX2 in two; the
# arithmetic is the same, lane for lane, so both give the same bits.
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
ISAS = {
    "avx512": _AVX2 + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
    "avx2": _AVX2,
}
ISA_VARIABLE = "JAXFIRE_CPU_ISA"  # names the build to use instead of the widest
log = logging.getLogger("jaxfire.cpu_kernels")


class KernelUnavailable(RuntimeError):
    """This machine cannot build or run the kernel."""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def supported_isas() -> list[str]:
    """The kernel builds this CPU can run, widest first."""
    flags = _cpu_flags()
    return [name for name, cc in ISAS.items() if {f.removeprefix("-m") for f in cc} <= flags]


def isa() -> str:
    """The kernel build this process uses: $JAXFIRE_CPU_ISA if set, else the widest this CPU
    runs (KernelUnavailable when it runs none, or not the one asked for)."""
    supported = supported_isas()
    wanted = os.environ.get(ISA_VARIABLE, "")
    if wanted and wanted not in ISAS:
        raise KernelUnavailable(f"{ISA_VARIABLE}={wanted!r} is none of {', '.join(ISAS)}")
    if wanted and wanted not in supported:
        raise KernelUnavailable(f"{ISA_VARIABLE}={wanted} but this CPU lacks its instructions")
    if not supported:
        raise KernelUnavailable("needs a CPU with AVX2, FMA and F16C")
    return wanted or supported[0]


def _build(sources: list[Path], out: Path, flags: tuple[str, ...]) -> None:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (g++ or c++) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        cmd = [compiler, "-O3", *flags, "-std=c++17", "-shared", "-fPIC", "-w"]
        cmd += [f"-I{jax.ffi.include_dir()}", *map(str, sources), "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelUnavailable(f"building the CPU kernels failed:\n{done.stderr[-2000:]}")
        partial.replace(out)  # atomic: a concurrent build never loads a half-written file


@functools.cache
def _register() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"needs x86-64, this is {platform.machine()}")
    build = isa()
    digest = hashlib.sha256(jax.ffi.include_dir().encode())
    for path in _SOURCES + _HEADERS:
        digest.update(path.read_bytes())
    lib_path = cache_root() / "kernels" / f"cpu_kernels-{build}-{digest.hexdigest()[:16]}.so"
    if not lib_path.exists():
        log.info("building the CPU kernels (%s) into %s", build, lib_path)
        _build(_SOURCES, lib_path, ISAS[build])
    lib = ctypes.cdll.LoadLibrary(str(lib_path))
    log.info("CPU kernels: the %s build", build)
    targets = (
        (MATMUL, lib.JaxfireMatmul),
        (ATTENTION, lib.JaxfireDecodeAttention),
        (PREFILL_ATTENTION, lib.JaxfirePrefillAttention),
        (EXTEND_ATTENTION, lib.JaxfireExtendAttention),
        (DECODE_LAYER, lib.JaxfireDecodeLayer),
        (TOP_K, lib.JaxfireTopK),
        (EMBED, lib.JaxfireEmbed),
    )
    for name, symbol in targets:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


@functools.cache
def available() -> bool:
    """True when JAX runs on CPU and the kernels build and load here."""
    if jax.default_backend() != "cpu":
        return False
    try:
        _register()
    except (KernelUnavailable, OSError, AttributeError) as e:  # AttributeError: an old jax.ffi
        log.warning("CPU kernels unavailable, using XLA's ops: %s", e)
        return False
    return True


def matmul(
    x: jax.Array, packed: jax.Array, n: int, valid_rows: jax.Array | None = None
) -> jax.Array:
    """f32[..., K] @ packed [ceil(n/16), K, 16] → f32[..., n].

    `valid_rows` (an int32 scalar, may be traced): the rows of x, counted over its leading
    axes flattened, from which on x is padding; their outputs are zero, not computed."""
    _register()
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32)
    rows = x.size // x.shape[-1] if valid_rows is None else valid_rows
    return jax.ffi.ffi_call(MATMUL, out)(
        x.astype(jnp.float32), packed, jnp.asarray(rows, jnp.int32)
    )


def embedding(packed: jax.Array, tokens: jax.Array) -> jax.Array:
    """f32[*tokens.shape, K]: column tokens[...] of a packed [K, N] weight (pack), each
    value exactly the one packed. A tied model's LM head is its embedding transposed, so
    this is the token lookup without a float32 copy of the embedding."""
    _register()
    k = packed.shape[1] if packed.dtype != jnp.uint8 else packed.shape[1] * QUANT_BLOCK
    out = jax.ShapeDtypeStruct((*tokens.shape, k), jnp.float32)
    return jax.ffi.ffi_call(EMBED, out)(packed, tokens.astype(jnp.int32))


def decode_attention(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,
    page_table: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    num_heads: int,
    window: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row from its fused projection qkv f32[B, (H + 2K) D] (queries, keys,
    values side by side), with HF's rotate-half rotary embedding by cos / sin f32[B, D/2].

    Row b's rotated key and its value are written at position p = positions[b] of the sequence
    whose pages are page_table[b] (i32[B, pages_per_seq]; the page pools updated in place;
    nothing past its last page), then its query sees positions max(0, p + 1 - window) .. p.
    Returns (out f32[B, H D], keys, values)."""
    _register()
    out = (
        jax.ShapeDtypeStruct((qkv.shape[0], num_heads * keys.shape[-1]), jnp.float32),
        jax.ShapeDtypeStruct(keys.shape, keys.dtype),
        jax.ShapeDtypeStruct(values.shape, values.dtype),
    )
    call = jax.ffi.ffi_call(ATTENTION, out, input_output_aliases={5: 1, 6: 2})
    return call(
        qkv.astype(jnp.float32),
        cos.astype(jnp.float32),
        sin.astype(jnp.float32),
        positions.astype(jnp.int32),
        page_table.astype(jnp.int32),
        keys,
        values,
        num_heads=np.int64(num_heads),
        window=np.int64(window or 0),
    )


def decode_layer(
    x: jax.Array,
    weights: dict,
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,
    page_table: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    num_heads: int,
    window: int | None,
    eps: float,
    valid_rows: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Llama decoder layer (no biases) for one token per row x f32[B, D] at `positions`
    of the sequences whose pages are page_table i32[B, pages_per_seq], in one call: RMSNorm,
    q/k/v, attention as decode_attention (the page pools updated in place), o_proj +
    residual, RMSNorm, gate/up, SiLU(gate) * up, down_proj + residual.

    `weights`: the layer's packed parameters, engine.model's names (`input_layernorm`,
    `self_attn/qkv_proj`, `self_attn/o_proj`, `post_attention_layernorm`,
    `mlp/gate_up_proj`, `mlp/down_proj`). `valid_rows` (int32 scalar, may be traced; None: B):
    the rows from which on x is padding, not computed (zeros out, nothing written to their
    pages). Returns (y f32[B, D], keys, values)."""
    _register()
    attn, mlp = weights["self_attn"], weights["mlp"]
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct(keys.shape, keys.dtype),
        jax.ShapeDtypeStruct(values.shape, values.dtype),
    )
    call = jax.ffi.ffi_call(DECODE_LAYER, out, input_output_aliases={7: 1, 8: 2})
    return call(
        x.astype(jnp.float32),
        weights["input_layernorm"]["weight"],
        attn["qkv_proj"]["kernel"],
        cos.astype(jnp.float32),
        sin.astype(jnp.float32),
        positions.astype(jnp.int32),
        page_table.astype(jnp.int32),
        keys,
        values,
        attn["o_proj"]["kernel"],
        weights["post_attention_layernorm"]["weight"],
        mlp["gate_up_proj"]["kernel"],
        mlp["down_proj"]["kernel"],
        jnp.asarray(x.shape[0] if valid_rows is None else valid_rows, jnp.int32),
        num_heads=np.int64(num_heads),
        window=np.int64(window or 0),
        eps=np.float32(eps),
    )


def prefill_attention(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    valid_rows: jax.Array,
    num_heads: int,
    num_kv_heads: int,
    window: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal self-attention of T new tokens per row at positions 0 .. T-1, straight from the
    fused projection qkv f32[B, T, (H + 2K) D] (queries, keys, values side by side), with
    HF's rotate-half rotary embedding by cos / sin f32[T, D/2] applied to queries and keys.

    Returns (out f32[B, T, H D], keys f32[B, K, T, D] rotated, values f32[B, K, T, D]): the
    cache's layout. The query at position t sees keys max(0, t + 1 - window) .. t. Tokens
    from `valid_rows` on (int32 scalar, over [B, T] flattened) are padding: zeros out."""
    _register()
    b, t, width = qkv.shape
    dim = width // (num_heads + 2 * num_kv_heads)
    kv = jax.ShapeDtypeStruct((b, num_kv_heads, t, dim), jnp.float32)
    out = (jax.ShapeDtypeStruct((b, t, num_heads * dim), jnp.float32), kv, kv)
    return jax.ffi.ffi_call(PREFILL_ATTENTION, out)(
        qkv.astype(jnp.float32),
        cos.astype(jnp.float32),
        sin.astype(jnp.float32),
        jnp.asarray(valid_rows, jnp.int32),
        num_heads=np.int64(num_heads),
        window=np.int64(window or 0),
    )


def extend_attention(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    starts: jax.Array,
    valid: jax.Array,
    pages: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    num_heads: int,
    window: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal attention of T new tokens of each of B sequences whose positions before their
    start their pages already hold: qkv f32[B, T, (H + 2K) D] as in prefill_attention,
    cos / sin f32[B, T, D/2] of row b's positions starts[b] .. starts[b] + T - 1, the first
    valid[b] tokens of row b real, pages i32[B, pages_per_seq] the rows' page-table rows
    (starts and valid i32[B], may be traced; with B = 1 scalars, cos / sin [T, D/2] and a
    page-table row [pages_per_seq] too).

    Their rotated keys and values are written into their pages of the pools in place
    (nothing past a row's last page), then the query at position p sees its sequence's
    positions max(0, p + 1 - window) .. p. Returns (out f32[B, T, H D], zeros for padding;
    keys; values). Each row's result is the one it gets alone."""
    _register()
    B, T = qkv.shape[:2]
    out = (
        jax.ShapeDtypeStruct((B, T, num_heads * keys.shape[-1]), jnp.float32),
        jax.ShapeDtypeStruct(keys.shape, keys.dtype),
        jax.ShapeDtypeStruct(values.shape, values.dtype),
    )
    call = jax.ffi.ffi_call(EXTEND_ATTENTION, out, input_output_aliases={6: 1, 7: 2})
    per_row = lambda x: jnp.asarray(x, jnp.int32).reshape(B)  # noqa: E731
    angles = lambda x: x.astype(jnp.float32).reshape(B, T, -1)  # noqa: E731
    return call(
        qkv.astype(jnp.float32),
        angles(cos),
        angles(sin),
        per_row(starts),
        per_row(valid),
        jnp.asarray(pages, jnp.int32).reshape(B, -1),
        keys,
        values,
        num_heads=np.int64(num_heads),
        window=np.int64(window or 0),
    )


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k of f32[S, V] rows, the same values and ids (ties by lower id), by selection
    rather than XLA CPU's sort: (f32[S, k] descending, i32[S, k])."""
    _register()
    s = x.shape[0]
    out = (jax.ShapeDtypeStruct((s, k), jnp.float32), jax.ShapeDtypeStruct((s, k), jnp.int32))
    return jax.ffi.ffi_call(TOP_K, out)(x.astype(jnp.float32))
