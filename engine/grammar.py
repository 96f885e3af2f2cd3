"""Grammar constraints (response_format, tool_choice): llguidance matchers and their masks.

A request's grammar is llguidance grammar text (serving builds it from a JSON schema, GBNF or
a tool list). Each distinct text is compiled and checked against the tokenizer once and kept
(`Grammars`, least recently used out); each choice follows its own copy (`Constraint`), which
consumes the choice's tokens on the host and fills its row of the packed mask that the decode
program applies (samplers.mask): bit t of a row allows token t.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import jax
import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from engine.requests import InvalidRequest
from engine.tokenizer import Tokenizer

# Parser limits for a request's grammar: llguidance's defaults bound the work of one mask
# (a few ms at most); a grammar beyond them is refused when it is compiled, not mid-reply.
_LIMITS = llguidance.LLParserLimits()


class Constraint:
    """One choice's grammar state: the tokens it allows next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow (the grammar is complete), or the matcher failed."""
        return self.matcher.is_stopped()

    def fill(self, masks: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into row `row` of i32[R, W] masks."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, masks, row)


class Grammars:
    """Compiled grammars of one tokenizer, shared by every request (any thread)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, capacity: int = 64):
        self._hf = tokenizer.hf
        self._eos = sorted(tokenizer.eos_token_ids)
        self.vocab_size = vocab_size
        self._capacity = capacity
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        # Built on the first grammar (about 0.5 s), so servers that never see one skip it.
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf, n_vocab=self.vocab_size, eos_token=self._eos
            )
        return self._tokenizer

    def compile(self, grammar: str, field: str) -> llguidance.LLMatcher:
        """The matcher at the start of `grammar`, kept for its next request; an invalid or
        unsupported grammar raises InvalidRequest naming `field` and llguidance's reason."""
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
                return template
            tokenizer = self._lltokenizer()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, tokenizer, limits=_LIMITS
        )
        # A warning is an unimplemented keyword or format: never accepted and ignored.
        if failed or messages:
            raise InvalidRequest(field, f"{field} cannot be enforced: {'; '.join(messages)}")
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_LIMITS)
        if template.is_error():
            raise InvalidRequest(field, f"{field} cannot be enforced: {template.get_error()}")
        with self._lock:
            self._compiled[grammar] = template
            while len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        return template

    def constraint(self, grammar: str, field: str) -> Constraint:
        """A fresh state of `grammar` for one choice."""
        return Constraint(self.compile(grammar, field).deep_copy())


class DecodeMasks:
    """The grammar masks of a decode call's rows: all ones for a free row; a constrained
    row's next tokens, filled (in parallel over rows) from its choice's matcher."""

    def __init__(self, words: int):
        self.words = words
        self._free: dict[tuple[int, Any], jax.Array] = {}
        self._executor: llguidance.LLExecutor | None = None
        # Seconds per fill of the constrained rows of one call (the benchmark reads them).
        self.fill_seconds: collections.deque[float] = collections.deque(maxlen=100_000)

    def build(self, rows: int, constraints: dict[int, Constraint], sharding: Any) -> jax.Array:
        """i32[rows, W] for a call over the first `rows` slots, placed as the decode program
        takes it (`sharding`); `constraints`: slot → the constraint of the choice decoding
        there. Free calls reuse one array on the device: no copy per call."""
        if not constraints:
            key = (rows, sharding)
            if key not in self._free:
                free = np.full((rows, self.words), -1, np.int32)
                self._free[key] = jax.device_put(free, sharding)
            return self._free[key]
        start = time.perf_counter()
        masks = np.full((rows, self.words), -1, np.int32)
        if len(constraints) == 1:
            [(slot, c)] = constraints.items()
            c.fill(masks, slot)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            pairs = [(c.matcher, slot) for slot, c in constraints.items()]
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, masks)
        self.fill_seconds.append(time.perf_counter() - start)
        return jax.device_put(masks, sharding)
