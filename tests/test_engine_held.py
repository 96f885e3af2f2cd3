"""engine.held: programs the engine holds survive emptying jax's caches, one per signature."""

import jax
import jax.numpy as jnp
import numpy as np

from engine.held import Held, forget_traces


def traced_counter():
    traces = []

    def f(x, y):
        traces.append(x.shape)  # runs only while tracing
        return x * 2 + y

    return f, traces


def test_a_held_program_is_not_traced_again_after_the_caches_are_emptied():
    f, traces = traced_counter()
    held = Held(jax.jit(f))
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(held(x, np.float32(1)), x * 2 + 1)
    forget_traces()
    np.testing.assert_array_equal(held(x + 1, np.float32(0)), (x + 1) * 2)
    assert traces == [(3,)]
    held(np.arange(4, dtype=np.float32), np.float32(0))  # a new signature compiles
    assert traces == [(3,), (4,)]

    g, plain_traces = traced_counter()
    plain = jax.jit(g)
    plain(x, np.float32(1))
    forget_traces()
    plain(x, np.float32(1))
    assert plain_traces == [(3,), (3,)]  # what holding avoids


def test_signatures_tell_dtypes_and_trees_apart():
    held = Held(jax.jit(lambda t: jax.tree.map(lambda a: a + 1, t)))
    held({"a": np.zeros(2, np.float32)})
    held({"a": np.zeros(2, np.int32)})
    held({"b": np.zeros(2, np.float32)})
    held({"a": np.ones(2, np.float32)})
    assert len(held._programs) == 3


def test_a_held_program_donates_as_its_jit_does():
    held = Held(jax.jit(lambda a: a + 1, donate_argnums=0))
    a = jnp.zeros(4)
    out = held(a)
    np.testing.assert_array_equal(out, np.ones(4))
    assert a.is_deleted()
