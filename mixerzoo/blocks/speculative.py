"""Lossless decoding with a draft model (speculative sampling, Leviathan et al. 2023; Chen et al. 2023).

Each round the draft proposes n tokens one step at a time; the target scores the pending token and all n
in one call; a draft token d is kept with probability min(1, p(d) / q(d)) (p the target's distribution, q
the draft's, both after the same temperature / top-k / top-p), and the first rejected one is replaced by a
token drawn from max(p - q, 0) renormalised, or, when all are kept, one more is drawn from the target:
every emitted token is distributed exactly as the target alone would give it. At temperature 0 both
distributions are one-hot and this is "keep the draft while it matches the target's argmax".

Rolling back needs nothing of the mixers but the protocol: a state is never changed by the calls made
from it, so the target's and the draft's states before the round are re-run on the tokens each row kept,
the rest of the round marked invalid (pads are no-ops): recurrent, windowed and full-attention layers
alike land exactly where a token-by-token decode of the kept tokens would.
"""

from __future__ import annotations

import dataclasses

import torch

from mixerzoo.blocks.decoder import Decoder
from mixerzoo.blocks.generate import STOPPED, prefill, probabilities
from mixerzoo.mixers.base import check_count


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """Tokens [B, max_new_tokens] (STOPPED after a row's stop token) and what the draft achieved."""

    tokens: torch.Tensor
    drafted: int  # draft tokens proposed, over the rows still running
    accepted: int  # of those, kept
    target_calls: int  # target forward calls after the prefill (re-runs for a rollback included)

    @property
    def acceptance(self) -> float:
        """Share of the draft's tokens the target kept."""
        return self.accepted / max(self.drafted, 1)


@torch.inference_mode()
def speculative_generate(
    model: Decoder,
    draft: Decoder,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    draft_tokens: int = 4,
    valid: torch.Tensor | None = None,
    stop_tokens=(),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> SpeculativeResult:
    """Decode `max_new_tokens` per row from `model` with `draft` proposing `draft_tokens` per round; the
    tokens are distributed as `generate(model, ...)` gives them (at temperature 0: the same tokens)."""
    check_count("max_new_tokens", max_new_tokens, minimum=1, owner="speculative_generate")
    check_count("draft_tokens", draft_tokens, minimum=1, owner="speculative_generate")
    if draft.spec.vocab_size != model.spec.vocab_size:
        raise ValueError(f"speculative_generate: the draft's vocabulary ({draft.spec.vocab_size}) is not the "
                         f"target's ({model.spec.vocab_size})")
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    batch, device = input_ids.shape[0], input_ids.device
    logits, state = prefill(model, input_ids, valid=valid)
    _, draft_state = prefill(draft, input_ids, valid=valid)
    pending = _draw(probabilities(logits, **settings), generator)  # [B]: emitted, not yet fed to either model
    emitted = [[t] for t in pending.tolist()]
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    running = ~torch.isin(pending, stops)
    drafted = accepted = calls = 0
    steps = torch.arange(draft_tokens + 1, device=device)
    while running.any() and min(len(row) for row, on in zip(emitted, running.tolist()) if on) < max_new_tokens:
        proposals, draft_probs, scratch, token = [], [], draft_state, pending
        step_valid = None if bool(running.all()) else running[:, None]  # None: every row runs, no masking
        for _ in range(draft_tokens):
            step_logits, scratch = draft(token[:, None], scratch, valid=step_valid)
            q = probabilities(step_logits[:, 0].float(), **settings)
            token = _draw(q, generator)
            proposals.append(token)
            draft_probs.append(q)
        chunk = torch.stack([pending, *proposals], dim=1)  # [B, n + 1]
        target_logits, scored = model(chunk, state, valid=None if step_valid is None else step_valid.expand_as(chunk))
        calls += 1
        p = probabilities(target_logits.float(), **settings)  # [B, n + 1, V]: p[:, j] judges proposal j + 1
        q = torch.stack(draft_probs, dim=1)  # [B, n, V]
        proposed = torch.stack(proposals, dim=1)  # [B, n]
        p_of, q_of = (t[:, :draft_tokens].gather(-1, proposed[..., None])[..., 0] for t in (p, q))
        uniform = torch.rand(p_of.shape, generator=generator, device=device)
        kept = (uniform * q_of < p_of).int().cumprod(1)  # [B, n]: the leading run of kept proposals
        n_kept = kept.sum(1)  # [B]
        rows = torch.arange(batch, device=device)
        at = p[rows, n_kept]  # [B, V]: the target's distribution for the token after the kept ones
        rejected = n_kept < draft_tokens
        residual = (at - torch.where(rejected[:, None], q[rows, n_kept.clamp(max=draft_tokens - 1)], 0)).clamp_min(0)
        following = _draw(residual / residual.sum(-1, keepdim=True), generator)
        drafted += int(running.sum()) * draft_tokens
        accepted += int((n_kept * running).sum())
        keep_mask = (steps <= n_kept[:, None]) & running[:, None]  # [B, n + 1]: pending + kept proposals
        if bool((n_kept[running] == draft_tokens).all()):
            state = scored
        else:  # roll back: the state before the round, re-run on what each row kept
            _, state = model(chunk, state, valid=keep_mask)
            calls += 1
        _, draft_state = draft(chunk, draft_state, valid=keep_mask)
        for b in range(batch):
            if running[b]:
                emitted[b] += proposed[b, : n_kept[b]].tolist() + [int(following[b])]
        pending = torch.where(running, following, pending)
        running &= torch.tensor([not _stopped(row, stop_tokens) for row in emitted], device=device)
    return SpeculativeResult(_finish(emitted, max_new_tokens, stop_tokens, device), drafted, accepted, calls)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row [B] from probs [B, V] (a one-hot row gives its token)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stopped(row: list[int], stop_tokens) -> bool:
    return any(t in stop_tokens for t in row)


def _finish(emitted: list[list[int]], length: int, stop_tokens, device) -> torch.Tensor:
    """[B, length] tokens, each row cut at `length` and STOPPED after its first stop token."""
    out = torch.full((len(emitted), length), STOPPED, dtype=torch.long, device=device)
    for b, row in enumerate(emitted):
        row = row[:length]
        for i, token in enumerate(row):
            out[b, i] = token
            if token in stop_tokens:
                break
    return out
