"""What the scheduler knows of each request in flight, and how a sync's tokens become text.

A request (`Request`) has n choices (`Choice`), each decoded in a slot from its own sequence
of KV pages. Before a sequence decodes, its K/V up to the first decode input is computed
(`Fill`): a new prompt, once for all its choices (they then share its pages), or a preempted
choice's prompt and generated tokens, recomputed where the prefix cache no longer has them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from engine.grammar import Constraint
from engine.handle import Handle
from engine.requests import ChoiceUpdate, GenerationRequest, TokenLogprob
from engine.stop import StopMatcher
from engine.tokenizer import IncrementalDetokenizer


@dataclasses.dataclass(eq=False)
class Choice:
    index: int
    detok: IncrementalDetokenizer
    stop: StopMatcher
    order: int  # when it (last) started decoding: the latest started is preempted first
    seq: int = -1  # the allocator's sequence holding its K/V
    slot: int | None = None  # None while preempted
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    saved_row: Any = None  # its sampling state while preempted
    constraint: Constraint | None = None  # its grammar state (response_format, tools)

    def sequence(self, prompt: tuple[int, ...]) -> tuple[int, ...]:
        """Prompt and generated tokens: position p's K/V is that of token p."""
        return prompt + tuple(self.token_ids)


@dataclasses.dataclass(eq=False)
class Request:
    handle: Handle
    choices: list[Choice] = dataclasses.field(default_factory=list)
    pending: list[int] = dataclasses.field(default_factory=list)  # choices not yet started
    first_token_at: float | None = None
    prefill_at: float = 0.0

    def live(self) -> bool:
        return bool(self.pending) or any(not c.finished for c in self.choices)


@dataclasses.dataclass(eq=False)
class Fill:
    """A sequence being given its K/V for positions 0 .. len(ids) - 2; ids[-1] is its first
    decode input. `resume`: the preempted choice it continues, else the request's choices."""

    owner: Request
    seq: int
    ids: np.ndarray
    done: int  # positions that hold K/V already
    resume: Choice | None = None

    @property
    def target(self) -> int:
        return len(self.ids) - 1


def advance(
    r: GenerationRequest,
    choice: Choice,
    out: Any,
    slot: int,
    steps: list[int],
    eos_ids: frozenset[int] | set[int],
) -> ChoiceUpdate:
    """Fold one sync's tokens of a choice (decode steps `steps` of StepOutput `out`, row
    `slot`) into text, stop checks and logprobs. Tokens after a stop are dropped."""
    ids, entries, text, reason = [], [], "", None
    n_top = r.top_logprobs or 0
    for j in steps:
        tok = int(out.tokens[j, slot])
        ids.append(tok)
        choice.token_ids.append(tok)
        if r.top_logprobs is not None:
            top = zip(
                out.top_ids[j, slot, :n_top].tolist(),
                out.top_logprobs[j, slot, :n_top].tolist(),
                strict=True,
            )
            entries.append(
                TokenLogprob(
                    tok,
                    float(out.logprob[j, slot]),
                    float(out.sampling_logprob[j, slot]),
                    tuple(top),
                )
            )
        text += choice.stop.feed(choice.detok.add(tok))
        if choice.stop.stop_at is not None:
            reason = "stop"
            break
        if choice.constraint is not None:
            choice.constraint.consume(tok)
            if choice.constraint.done:  # complete: only EOS could follow
                reason = "stop"
                text += choice.stop.flush()
                break
        if out.finished[j, slot]:
            is_eos = tok in eos_ids and not r.ignore_eos
            reason = "stop" if is_eos else "length"
            text += choice.stop.flush()
            break
    choice.finished = reason is not None
    logprobs = tuple(entries) if r.top_logprobs is not None else None
    return ChoiceUpdate(choice.index, tuple(ids), text, logprobs, reason)
