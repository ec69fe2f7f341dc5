"""The experts channel mixer: equal to a per-token loop that runs every expert and keeps the top k (float64),
its two dispatch paths (gathered weights for a few tokens, grouped tokens for many) equal in value and
gradient, a decode-sized call free of host syncs, and its spec's errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mixerzoo.blocks import Decoder, Experts, LayoutSpec, MLPSpec
from mixerzoo.testing import assert_rel_close
from mixerzoo.testing.census import HostCensus

# float64 throughout: both sides sum the same k products in another order, ~1e-16 relative.
TOL64 = 1e-12

cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "tokens": st.integers(1, 40),
    "d_model": st.sampled_from([4, 8, 12]),
    "hidden": st.sampled_from([3, 8]),
    "n_experts": st.integers(1, 7),
    "top_k": st.integers(1, 7),
    "normalize": st.booleans(),
    "shared": st.sampled_from(["none", "plain", "gated"]),
})


def _experts(c) -> tuple[Experts, torch.Tensor]:
    torch.manual_seed(c["seed"])
    spec = MLPSpec(type="experts", hidden=c["hidden"], n_experts=c["n_experts"], top_k=min(c["top_k"], c["n_experts"]),
                   normalize_top_k=c["normalize"], shared_hidden=None if c["shared"] == "none" else 5,
                   shared_gate=c["shared"] == "gated")
    module = Experts(c["d_model"], spec).double()
    return module, torch.randn(c["tokens"], c["d_model"], dtype=torch.float64)


def _reference(module: Experts, x: torch.Tensor) -> torch.Tensor:
    """Per token: every expert's SwiGLU, weighted by its softmax probability if among the k largest, else 0."""
    rows = []
    for token in x:
        probabilities = (module.router.weight @ token).softmax(-1)
        chosen = probabilities.argsort(descending=True)[: module.top_k]
        weights = torch.zeros_like(probabilities)
        weights[chosen] = probabilities[chosen]
        if module.normalize:
            weights = weights / weights.sum()
        out = sum(weights[e] * (module.down_proj[e] @ (F.silu(module.gate_proj[e] @ token) * (module.up_proj[e] @ token)))
                  for e in range(module.n_experts))
        if hasattr(module, "shared_expert"):
            s = module.shared_expert
            shared = s.down_proj.weight @ (F.silu(s.gate_proj.weight @ token) * (s.up_proj.weight @ token))
            if hasattr(module, "shared_expert_gate"):
                shared = torch.sigmoid(module.shared_expert_gate.weight @ token) * shared
            out = out + shared
        rows.append(out)
    return torch.stack(rows)


@given(cases)
def test_experts_equal_a_per_token_loop_over_every_expert(c):
    module, x = _experts(c)
    with torch.no_grad():
        got = module(x.view(1, -1, c["d_model"]))[0]
        expected = _reference(module, x)
    assert torch.isfinite(got).all()
    assert_rel_close(got, expected, TOL64, what="experts")


@given(cases)
def test_the_gathered_and_grouped_dispatch_agree_in_value_and_gradient(c):
    module, x = _experts(c)
    weights, index = module.route(x)
    outputs = []
    for path in (module._gathered, module._grouped):
        leaves = [x.clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)]
        out = path(leaves[0], leaves[1], index)
        probe = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(c["seed"]))
        grads = torch.autograd.grad((out * probe).sum(), [*leaves, module.gate_proj, module.up_proj, module.down_proj])
        outputs.append([out, *grads])
    for name, a, b in zip(["out", "dx", "dweights", "dgate", "dup", "ddown"], *outputs):
        assert_rel_close(a, b, TOL64, what=f"dispatch {name}")


def test_a_decode_sized_call_makes_no_host_sync_and_a_long_one_runs_grouped():
    module = Experts(16, MLPSpec(type="experts", hidden=8, n_experts=8, top_k=2, shared_hidden=8, shared_gate=True))
    with torch.inference_mode(), HostCensus() as census:
        module(torch.randn(4, 1, 16))  # 4 tokens x 2 <= 8 experts: gathered
    assert census.syncs == 0, census.report()
    with torch.inference_mode(), HostCensus() as census:
        module(torch.randn(2, 9, 16))
    assert census.syncs == 1, census.report()  # the token counts per expert


def test_a_decoder_with_experts_trains_and_counts_only_active_experts_as_flops():
    from mixerzoo.blocks import flops_per_token

    def spec(mlp):
        return LayoutSpec.model_validate(dict(d_model=16, vocab_size=32, n_layers=2, pattern="F",
                                              legend={"F": dict(type="attention", n_heads=2)}, mlp=mlp))

    sparse = spec(dict(type="experts", hidden=8, n_experts=6, top_k=2))
    dense = spec(dict(type="swiglu", hidden=16))  # two experts' width: the same active weights
    router = 2 * 6 * 16  # the router's weights, per layer
    assert flops_per_token(sparse, 0) - flops_per_token(dense, 0) == 2 * router
    torch.manual_seed(0)
    model = Decoder(sparse)
    logits, _ = model(torch.randint(0, 32, (2, 8)))
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("fields, match", [
    (dict(type="experts", hidden=8, top_k=2), r"mlp\.n_experts is required"),
    (dict(type="experts", hidden=8, n_experts=2, top_k=3), r"mlp\.top_k = 3 is more than mlp\.n_experts = 2"),
    (dict(type="experts", hidden=8, n_experts=2, top_k=1, shared_gate=True), r"shared_gate needs a shared expert"),
    (dict(type="swiglu", hidden=8, n_experts=4), r"mlp\.n_experts is an experts field; the MLP type is 'swiglu'"),
])
def test_bad_expert_specs_are_refused_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        MLPSpec.model_validate(fields)
