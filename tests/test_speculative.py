"""Decoding with a draft model is lossless: at temperature 0 the tokens equal the target's own greedy tokens
for every kind of layer (a rejected draft token rolls every mixer's state back), and sampled tokens follow
the target's distribution exactly."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch

import mixerzoo as mz
from mixerzoo.blocks.generate import probabilities
from mixerzoo.blocks.speculative import speculative_generate
from mixerzoo.registry import recipe

# Recurrent, windowed, full-attention, parallel, latent-attention, convolutional and DPLR layers.
TARGETS = ["transformer", "infinitevl", "mamba2", "falcon-h1", "kimi-linear", "rwkv7", "lfm2", "samba"]


def _model(name: str, seed: int) -> mz.Decoder:
    torch.manual_seed(seed)
    return mz.Decoder(recipe(name, "tiny")).double().eval()


def _perturbed(model: mz.Decoder, scale: float) -> mz.Decoder:
    """A copy of `model` with every weight moved by noise: a draft that agrees with it part of the time."""
    copy = copy_module.deepcopy(model)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return copy


@pytest.mark.parametrize("name", TARGETS)
def test_greedy_with_a_draft_is_the_targets_greedy(name):
    """A distinct random draft (its proposals rejected: every round rolls back), a perturbed copy (some kept,
    the rest rolled back, rows differing) and the target as its own draft (all kept): each gives the target's
    greedy tokens for rows of different prompt lengths."""
    target = _model(name, 0)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, target.spec.vocab_size, (2, 9), generator=gen)
    valid = torch.ones_like(prompts, dtype=torch.bool)
    valid[1, :3] = False  # row 1: a 6-token prompt, left-padded
    expected = mz.generate(target, prompts, valid=valid, max_new_tokens=12)
    for draft, kind in ((_model("gdn", 7), "other"), (_perturbed(target, 0.15), "perturbed"), (target, "itself")):
        result = speculative_generate(target, draft, prompts, valid=valid, max_new_tokens=12, draft_tokens=3)
        print(f"{name}, draft {kind}: kept {result.acceptance:.2f} of the proposals")
        assert torch.equal(result.tokens, expected), f"{name}, draft {kind}: tokens differ"
        if kind == "itself":
            assert result.acceptance == 1.0, f"{name}: the target as its own draft kept {result.acceptance:.2f}"
        if kind == "perturbed":  # both the rollback and the keep paths ran
            assert 0 < result.acceptance < 1, f"{name}: the perturbed draft kept {result.acceptance:.2f}"


def test_generate_takes_a_draft_and_stop_tokens():
    target, draft = _model("infinitevl", 0), _model("gdn", 3)
    prompts = torch.randint(0, target.spec.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    plain = mz.generate(target, prompts, max_new_tokens=10)
    stop = int(plain[0, 3])  # row 0 stops at its 4th token
    expected = mz.generate(target, prompts, max_new_tokens=10, stop_tokens=[stop])
    got = mz.generate(target, prompts, max_new_tokens=10, stop_tokens=[stop], draft=draft, draft_tokens=2)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="'compile' is not taken with a draft model"):
        mz.generate(target, prompts, max_new_tokens=4, draft=draft, compile=True)


def test_sampled_tokens_follow_the_targets_distribution():
    """4,000 rows of one prompt, vocabulary 6, top_k 4: the second emitted token (the first a draft decided)
    and the first two together are distributed as the target gives them, within 4.5 standard errors per
    outcome (a false alarm below 1e-4 over the 36 + 6 outcomes)."""
    def tiny(seed):
        torch.manual_seed(seed)
        spec = mz.LayoutSpec.model_validate({"d_model": 16, "vocab_size": 6, "tie_embeddings": False, "layers": [
            {"mixer": {"type": "gated_deltanet", "n_heads": 2}, "mlp": {"type": "swiglu", "hidden": 32}}]})
        return mz.Decoder(spec).double().eval()

    target, draft = tiny(0), tiny(1)
    rows, settings = 4000, dict(temperature=1.3, top_k=4)
    prompt = torch.tensor([[1, 4, 2]]).repeat(rows, 1)
    result = speculative_generate(target, draft, prompt, max_new_tokens=2, draft_tokens=3,
                                  generator=torch.Generator().manual_seed(5), **settings)
    with torch.no_grad():
        first = probabilities(target(prompt[:1])[0][:, -1].double(), **settings)[0]  # [6]
        after = torch.stack([probabilities(target(torch.tensor([[1, 4, 2, t]]))[0][:, -1].double(), **settings)[0]
                             for t in range(6)])  # [6, 6]
    joint = (first[:, None] * after).double()  # P(t0, t1)
    pairs = torch.zeros(6, 6, dtype=torch.float64)
    pairs.index_put_((result.tokens[:, 0], result.tokens[:, 1]), torch.ones(rows, dtype=torch.float64), accumulate=True)
    for observed, exact, what in ((pairs / rows, joint, "pairs"), (pairs.sum(0) / rows, joint.sum(0), "second token")):
        error = (exact * (1 - exact) / rows).sqrt().clamp_min(1 / rows)
        worst = ((observed - exact).abs() / error).max().item()
        print(f"{what}: worst deviation {worst:.2f} standard errors")
        assert worst < 4.5, f"{what}: empirical frequencies off the target's distribution by {worst:.1f} s.e."
    assert 0 < result.acceptance < 1
