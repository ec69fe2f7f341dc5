"""Generation on the model-level state: chunked prefill, decode steps, sampling, streaming."""

from __future__ import annotations

import weakref
from typing import Callable, Iterator, Sequence

import torch

from mixerzoo.blocks.decoder import Decoder, DecoderState
from mixerzoo.mixers.base import check_count

STOPPED = -1  # token id reported for rows that have already stopped


@torch.inference_mode()
def prefill(
    model: Decoder,
    input_ids: torch.Tensor,
    state: DecoderState | None = None,
    *,
    valid: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, DecoderState]:
    """Feed prompts [B, T] (pads marked by `valid`) in chunks of `chunk_size` (default: one call).

    Returns the logits [B, vocab] at each row's last valid token (zeros for a row with
    none) and the state after the prompts.
    """
    batch, length = input_ids.shape
    if valid is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"prefill: chunk_size must be >= 1, got {chunk_size}")
    step = chunk_size or length
    last = torch.zeros(batch, model.spec.vocab_size, device=input_ids.device)
    for start in range(0, length, step):
        ids, chunk_valid = input_ids[:, start : start + step], valid[:, start : start + step]
        logits, state = model(ids, state, valid=chunk_valid)
        has_token = chunk_valid.any(1)
        last_index = chunk_valid.shape[1] - 1 - chunk_valid.flip(1).to(torch.int8).argmax(1)  # last valid per row
        last = torch.where(has_token[:, None], logits[torch.arange(batch), last_index].float(), last)
    return last, state


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else sampled after
    temperature scaling, keeping the top_k tokens and the smallest set with mass >= top_p."""
    if temperature == 0:
        check_sampling(temperature, top_k, top_p)
        return logits.argmax(-1)
    probs = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the sampling setting that is out of range."""
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample: top_k must be >= 1, got {top_k}")


def probabilities(
    logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution [..., vocab] (float32) that `sample` draws from: one-hot on the argmax at temperature 0."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    scores = logits.float() / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        mass_before = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1)
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1)


@torch.inference_mode()
def stream(
    model: Decoder,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    valid: torch.Tensor | None = None,
    state: DecoderState | None = None,
    chunk_size: int | None = None,
    **sampling,
) -> Iterator[torch.Tensor]:
    """Prefill the prompts, then yield the next token of every row [B] per step (see `continue_stream`).

    sampling: stop_tokens, temperature, top_k, top_p, generator, compile.
    """
    check_count("max_new_tokens", max_new_tokens, minimum=1, owner="generate")
    logits, state = prefill(model, input_ids, state, valid=valid, chunk_size=chunk_size)
    yield from continue_stream(model, logits, state, max_new_tokens=max_new_tokens, **sampling)


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()


def compiled_step(model: torch.nn.Module) -> Callable:
    """`model`'s forward (a Decoder's or a VLM's) as one compiled program (torch.compile, fullgraph, static
    shapes), made once per model and reused: over a state of fixed shapes (`with_capacity`) it compiles
    once per kind of step (a T = 1 decode step, the same with a `valid` mask, a stream frame of one size)
    and never again."""
    if model not in _COMPILED:
        program = torch.compile(model, fullgraph=True, dynamic=False)

        def step(tokens: torch.Tensor, state, **kwargs):
            return program(tokens, state.canonical(), **kwargs)  # one layout, so one set of guards

        _COMPILED[model] = step
    return _COMPILED[model]


@torch.inference_mode()
def continue_stream(
    model,
    logits: torch.Tensor,
    state,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """From next-token logits [B, vocab] and the state that produced them, yield the next token
    of every row [B] at each step, STOPPED (-1) for rows that are done.

    `model(tokens [B, 1], state, valid=...)` must return (logits [B, 1, vocab], state): a
    Decoder or a VLM. A row stops after emitting one of `stop_tokens`; its later steps are
    pads (no-ops on its state). Ends after max_new_tokens steps or when every row has stopped.
    Without stop tokens a step never waits for the device; with them the loop reads one count
    per step to know which rows still run. compile=True (a Decoder or a VLM) runs each step as one
    compiled program (`compiled_step`) over a state with full-attention caches preallocated
    for max_new_tokens more tokens; the first step compiles (tens of seconds on a CPU).
    """
    check_count("max_new_tokens", max_new_tokens, minimum=1, owner="generate")
    step = model
    if compile:
        if not isinstance(model, torch.nn.Module) or not hasattr(state, "with_capacity"):
            raise ValueError(f"continue_stream: compile=True takes a Decoder or a VLM with its state, got a "
                             f"{type(model).__name__}")
        longest = int(state.seen.max())  # once, before the loop
        state, step = state.with_capacity(longest + max_new_tokens), compiled_step(model)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=logits.device)
    running = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    batch = logits.shape[0]
    for _ in range(max_new_tokens):
        token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield torch.where(running, token, STOPPED) if stop_tokens else token
        valid = None  # every row runs
        if stop_tokens:
            running &= ~torch.isin(token, stops)
            still = int(running.sum())  # the loop's one read per step
            if still == 0:
                return
            valid = None if still == batch else running[:, None]
        step_logits, state = step(token[:, None], state, valid=valid)
        logits = step_logits[:, 0].float()


def generate(model: Decoder, input_ids: torch.Tensor, *, draft: Decoder | None = None, draft_tokens: int = 4,
             **kwargs) -> torch.Tensor:
    """All tokens of `stream` (same arguments) as [B, steps], STOPPED after a row's stop token. With `draft`,
    that model proposes `draft_tokens` per round and the target keeps what its own distribution allows
    (`speculative_generate`: the same tokens at temperature 0, the same distribution otherwise)."""
    if draft is None:
        return torch.stack(list(stream(model, input_ids, **kwargs)), dim=1)
    from mixerzoo.blocks.speculative import speculative_generate

    unsupported = sorted(set(kwargs) & {"state", "chunk_size", "compile"})
    if unsupported:
        raise ValueError(f"generate: {unsupported[0]!r} is not taken with a draft model")
    return speculative_generate(model, draft, input_ids, draft_tokens=draft_tokens, **kwargs).tokens
