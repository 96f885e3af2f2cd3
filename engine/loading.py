"""From a model name or path to parameters on the mesh, through the converted-weights cache.

The first load of a source reads it through checkpoints/ (HF safetensors, GGUF), maps HF
names onto the engine's tree and saves that tree, tensor by tensor in the source's dtype, as
orbax checkpoints in the cache folder (engine.disk_cache); later loads restore straight from
there, each array placed with its sharding and cast to the compute dtype.

Several processes may convert into one cache folder at once (the hosts of a slice sharing a
filesystem): the first to finish publishes it, the others drop theirs (checkpoints.store).
Under jax.distributed a host converts in a child process of single-process JAX: orbax writes
host arrays from process 0 alone there, so the other hosts' folders would hold no arrays.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from checkpoints import CheckpointError, gguf, registry, store
from engine import disk_cache
from engine.config import ModelConfig
from engine.quantize import check_format, quantize_layer
from engine.tokenizer import Tokenizer
from engine.weights import fuse_layer, lazy_params_from_hf, pack_for_cpu_kernels


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    generation_config: dict | None
    dtype: jnp.dtype
    folder: Path  # the converted checkpoint it was restored from
    packed: bool = False  # matrices packed for engine.cpu_kernels


def convert(
    name_or_path: str,
    dst: str | Path | None = None,
    progress: bool = True,
    dtype: str | None = None,
) -> Path:
    """Convert a source into a jaxfire checkpoint at dst, replacing what is there (default:
    the cache, where a complete conversion, another process's perhaps, is kept instead).

    Matrices keep the source's dtype (a quantized GGUF tensor becomes float32), or take
    `dtype` ("float32", "bfloat16", "float16"); norm weights are float32 either way. The
    tree is built and saved one tensor at a time, so converting holds about one tensor.
    Everything the checkpoint needs (config, weights' names and shapes, tokenizer) is checked
    before the first tensor is read, so a bad source fails in a moment, not after converting."""
    resolved = registry.resolve(name_or_path)
    if store.is_complete(resolved.source):
        return resolved.source
    cached = dst is None
    if cached:
        dst = disk_cache.converted_dir(resolved.name, resolved.source, dtype or "auto")
        if store.is_complete(dst):
            return dst
    ckpt = resolved.open()
    config = ModelConfig.from_hf(ckpt.config)
    ckpt.require_tokenizer()
    makers = lazy_params_from_hf(ckpt, config, None if dtype is None else jnp.dtype(dtype))
    bar = tqdm(
        total=len(jax.tree.leaves(makers)),
        desc=f"converting {resolved.name}",
        unit="tensor",
        disable=not progress,
        file=sys.stderr,
    )

    def counted(make: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        def made() -> np.ndarray:
            array = make()
            bar.update()
            return array

        return made

    try:
        return store.save(
            dst,
            jax.tree.map(counted, makers),
            metadata={"name": resolved.name, "source": str(resolved.source)},
            config=ckpt.config,
            generation_config=ckpt.generation_config,
            write_tokenizer=ckpt.save_tokenizer,
            replace=not cached,
        )
    finally:
        bar.close()


def _convert_in_a_child(name_or_path: str) -> None:
    """`convert(name_or_path)` into the cache, in a child process of single-process JAX on the
    CPU (see the module's docstring); its progress and errors go to this process's stderr."""
    code = "import sys; from engine.loading import convert; convert(sys.argv[1])"
    root = str(Path(__file__).resolve().parents[1])  # where this copy of jaxfire is imported from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code, name_or_path], env=env)
    if done.returncode != 0:
        raise CheckpointError(
            f"converting {name_or_path} failed in its child process (exit status "
            f"{done.returncode}; its error is above)"
        )


def load_model(
    name_or_path: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    shardings: Callable[[Any], Any] | None = None,
    packed: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Restore a model, converting it into the cache on first use.

    `shardings` maps the abstract parameter tree to a tree of Shardings; `packed` lays the
    matrices out for engine.cpu_kernels (one CPU device, float32 activations); `quantize`
    ("int8" or "fp8", engine.quantize) stores XLA's matrices in one byte a weight."""
    resolved = registry.resolve(name_or_path)
    cached = disk_cache.converted_dir(resolved.name, resolved.source, "auto")
    folder = resolved.source if store.is_complete(resolved.source) else cached
    if not store.is_complete(folder):
        if jax.process_count() > 1:
            _convert_in_a_child(name_or_path)
        else:
            convert(name_or_path)
    if jax.process_count() > 1:
        # orbax's restore waits 5 minutes at most for the other processes at its barriers:
        # wait here instead, for as long as the slowest host's conversion takes.
        multihost_utils.sync_global_devices("jaxfire: converted weights on every host")
    info = store.load_info(folder)
    config = ModelConfig.from_hf(info.config or {})
    abstract = store.stored_arrays(folder)
    placement = shardings(abstract) if shardings else jax.tree.map(lambda _: None, abstract)

    def target(path, leaf: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
        # Norm weights (a `weight` under a *norm module: the model's, the layers', q/k heads')
        # stay float32; matrices and biases take the compute dtype, whatever the stored one.
        names = [str(getattr(key, "key", key)) for key in path]
        norm = len(names) > 1 and names[-1] == "weight" and "norm" in names[-2]
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, jnp.float32 if norm else dtype, sharding=sharding)

    params = store.restore(folder, jax.tree_util.tree_map_with_path(target, abstract, placement))
    if packed and quantize:
        raise ValueError("quantize is for XLA's path; the CPU kernels pack weights themselves")
    params = _fused(params, config, shardings, quantize and check_format(quantize))
    if packed:
        params = jax.device_put(pack_for_cpu_kernels(params, config))
    return_freed_memory()
    generation_config = info.generation_config or resolved.generation_config
    return LoadedModel(
        name=info.metadata.get("name", resolved.name),
        config=config,
        params=params,
        tokenizer=Tokenizer.from_dir(folder, generation_config),
        generation_config=generation_config,
        dtype=dtype,
        folder=folder,
        packed=packed,
    )


def default_quantization(name_or_path: str, mesh: jax.sharding.Mesh) -> str:
    """int8 for a GGUF file with quantized matrices on an accelerator (not expanded to
    the compute dtype there), else none."""
    if mesh.devices.flat[0].platform == "cpu":
        return "none"
    source = registry.resolve(name_or_path).source
    quantized = source.suffix == ".gguf" and gguf.has_quantized_matrices(source)
    return "int8" if quantized else "none"


def _fused(
    params: Any,
    config: ModelConfig,
    shardings: Callable[[Any], Any] | None,
    quantize: str | None,
) -> Any:
    """The restored tree with each layer's q/k/v and gate/up fused (engine.weights.FUSED)
    and, with `quantize`, its matrices quantized (engine.quantize), layer by layer on the
    device with the new matrices' own shardings, so the extra memory is one layer's."""
    params = dict(params)

    def fuse(layer: Any) -> Any:
        fused = fuse_layer(layer, config)
        return quantize_layer(fused, quantize) if quantize else fused

    for i in range(config.num_layers):
        name = f"layers_{i}"
        layer = params[name]
        placement = shardings(jax.eval_shape(fuse, layer)) if shardings else None
        params[name] = jax.jit(fuse, out_shardings=placement)(layer)
        for leaf in jax.tree.leaves(layer):
            leaf.delete()
    return params


# glibc's mallopt parameter for the most heaps ("arenas") malloc keeps.
_M_ARENA_MAX = -8


def limit_heap_arenas(arenas: int = 2) -> None:
    """Let glibc's malloc keep at most `arenas` heaps (unless MALLOC_ARENA_MAX says otherwise),
    before the server's threads start allocating: by default each thread that meets a locked
    heap gets one of its own, up to 8 a core, and the compiler's, the runtime's and the
    server's threads each kept their freed pages in theirs (`jaxfire serve`: 1,417 -> 1,385
    MiB resident with 2; decode speed at 1, 8 and 32 sequences unchanged, scripts/bench_ab.py
    --new-env MALLOC_ARENA_MAX=2)."""
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, arenas)


def return_freed_memory() -> None:
    """Hand the heap pages freed since the start back to the OS (glibc's malloc_trim, every
    arena): glibc keeps freed pages mapped, and they stayed in the server's resident memory.
    After loading: the restore's buffers and the float32 matrices packing replaced (~0.5 GB
    for the default model); after compiling: the compiler's temporaries, freed on the
    background thread's own arena (~0.1 GB)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose malloc the two functions above tune), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
