"""Zoo mixers equal transformers' torch paths of the same layers given the same weights (state_dicts load
without renaming): LFM2's short conv, Mamba1's mixer, RecurrentGemma's recurrent block."""

from __future__ import annotations

import pytest
import torch

from mixerzoo.registry import build_mixer
from mixerzoo.testing import assert_rel_close

transformers = pytest.importorskip("transformers", reason="transformers is not installed: no oracle")

# float32, one forward of 16-24 tokens through the same ops in another order: rounding ~T * eps32 = 2e-6;
# 1e-5 relative (measured <= 1e-6).
TOL = 1e-5
D_MODEL, LENGTH = 32, 19


def _compare(ours, theirs_fn, what):
    torch.manual_seed(1)
    x = torch.randn(2, LENGTH, D_MODEL)
    with torch.no_grad():
        expected = theirs_fn(x)
        got, state = ours(x)
        split, state2 = ours(x[:, :7])  # and in two chunks, through our state
        rest, _ = ours(x[:, 7:], state2)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{what}: relative error {err:.2e}")
    assert_rel_close(got, expected, TOL, what=what)
    assert_rel_close(torch.cat([split, rest], 1), expected, TOL, what=f"{what} in two chunks")


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_short_conv_equals_transformers_lfm2():
    from transformers.models.lfm2.configuration_lfm2 import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv

    config = Lfm2Config(hidden_size=D_MODEL, conv_L_cache=3, conv_bias=True, num_hidden_layers=1,
                        layer_types=["conv"], num_attention_heads=4, num_key_value_heads=4)
    theirs = Lfm2ShortConv(config, layer_idx=0).eval()
    _randomize(theirs)
    ours = build_mixer({"type": "short_conv", "d_model": D_MODEL, "conv_size": 3, "bias": True})
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, lambda x: theirs(x), "short_conv vs Lfm2ShortConv")


def test_mamba_equals_transformers_mamba_mixer():
    from transformers.models.mamba.configuration_mamba import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = MambaConfig(hidden_size=D_MODEL, state_size=8, conv_kernel=4, expand=2, time_step_rank=4,
                         num_hidden_layers=1, use_mambapy=False)
    theirs = MambaMixer(config, layer_idx=0).eval()
    _randomize(theirs)
    with torch.no_grad():
        theirs.A_log.copy_(torch.rand_like(theirs.A_log) * 2)  # A = -exp(A_log): a range of decays
    ours = build_mixer({"type": "mamba", "d_model": D_MODEL, "d_state": 8, "d_conv": 4, "expand": 2, "dt_rank": 4,
                        "chunk_size": 8})
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, lambda x: theirs(x), "mamba vs MambaMixer")


def test_rglru_equals_transformers_recurrent_gemma_block():
    from transformers.models.recurrent_gemma.configuration_recurrent_gemma import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock

    config = RecurrentGemmaConfig(hidden_size=D_MODEL, lru_width=D_MODEL, num_attention_heads=4, conv1d_width=4,
                                  num_hidden_layers=1, hidden_activation="gelu_pytorch_tanh")
    theirs = RecurrentGemmaRecurrentBlock(config, layer_idx=0).eval()
    _randomize(theirs)
    ours = build_mixer({"type": "rglru", "d_model": D_MODEL, "n_heads": 4, "conv_size": 4, "chunk_size": 8})
    ours.load_state_dict(theirs.state_dict())
    positions = torch.arange(LENGTH).expand(2, -1)
    _compare(ours, lambda x: theirs(x, positions, None, use_cache=False)[0], "rglru vs RecurrentGemmaRecurrentBlock")


def test_lightning_equals_transformers_minimax_lightning_attention():
    from transformers.models.minimax.configuration_minimax import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    heads, head_dim = 4, 8
    config = MiniMaxConfig(hidden_size=D_MODEL, num_attention_heads=heads, head_dim=head_dim, num_key_value_heads=heads,
                           num_hidden_layers=2, block_size=8, layer_types=["linear_attention", "full_attention"])
    theirs = MiniMaxLightningAttention(config, layer_idx=0).eval()
    _randomize(theirs)
    factor = 1 - 0 / (config.num_hidden_layers - 1 + 1e-5) + 1e-5  # MiniMax's slope factor at layer 0
    ours = build_mixer({"type": "lightning", "d_model": D_MODEL, "n_heads": heads, "head_dim": head_dim,
                        "decay_scale": factor, "norm_eps": theirs.norm.variance_epsilon, "chunk_size": 8})
    q, k, v = theirs.qkv_proj.weight.view(heads, 3, head_dim, D_MODEL).unbind(1)  # per head: q | k | v rows
    ours.load_state_dict({
        "q_proj.weight": q.reshape(-1, D_MODEL), "k_proj.weight": k.reshape(-1, D_MODEL),
        "v_proj.weight": v.reshape(-1, D_MODEL), "g_proj.weight": theirs.output_gate.weight,
        "o_norm.weight": theirs.norm.weight, "o_proj.weight": theirs.out_proj.weight,
    })
    _compare(ours, lambda x: theirs(x, None, None)[0], "lightning vs MiniMaxLightningAttention")


def _causal_mask(length: int) -> torch.Tensor:
    """transformers' additive 4-D causal mask [1, 1, T, T] for the eager attention path."""
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_equals_transformers_deepseek_v3_attention(q_lora_rank):
    """Our latent-space MLA (and its expanded reference) against DeepseekV3Attention's eager path, which
    expands every head's keys and values (rotate-half RoPE: rope_interleave false)."""
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                              q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                              rope_interleave=False, num_hidden_layers=1, attention_bias=False)
    config._attn_implementation = "eager"
    theirs = DeepseekV3Attention(config, layer_idx=0).eval()
    _randomize(theirs)
    rotary = DeepseekV3RotaryEmbedding(config)
    spec = {"type": "mla", "d_model": D_MODEL, "n_heads": 4, "kv_lora_rank": 16, "q_lora_rank": q_lora_rank,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
            "rope": {"theta": config.rope_parameters["rope_theta"]}}
    positions = torch.arange(LENGTH).expand(2, -1)

    def expected(x):
        return theirs(x, rotary(x, positions), _causal_mask(LENGTH))[0]

    for backend in ("torch", "reference"):
        ours = build_mixer({**spec, "backend": backend})
        ours.load_state_dict(theirs.state_dict())
        _compare(ours, expected, f"mla ({backend}, q_lora_rank {q_lora_rank}) vs DeepseekV3Attention")


def test_gated_attention_equals_transformers_qwen3_next_attention():
    """attention with output_gate, qk_norm and partial rotary (rope.fraction 0.25) against Qwen3NextAttention's
    eager path. Its q_proj holds each head's query and gate side by side and its RMSNorms scale by 1 + w: the
    weights are split and offset, nothing else."""
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

    heads, kv_heads, head_dim = 4, 2, 16
    config = Qwen3NextConfig(hidden_size=D_MODEL, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=head_dim, partial_rotary_factor=0.25, num_hidden_layers=1,
                             layer_types=["full_attention"], attention_bias=False)
    config._attn_implementation = "eager"
    theirs = Qwen3NextAttention(config, layer_idx=0).eval()
    _randomize(theirs)
    rotary = Qwen3NextRotaryEmbedding(config)
    ours = build_mixer({"type": "attention", "d_model": D_MODEL, "n_heads": heads, "n_kv_heads": kv_heads,
                        "head_dim": head_dim, "output_gate": True, "qk_norm": True, "norm_eps": config.rms_norm_eps,
                        "rope": {"theta": config.rope_parameters["rope_theta"], "fraction": 0.25}})
    weights = theirs.state_dict()
    query, gate = weights.pop("q_proj.weight").unflatten(0, (heads, 2 * head_dim)).chunk(2, dim=1)
    weights |= {"q_proj.weight": query.flatten(0, 1), "gate_proj.weight": gate.flatten(0, 1),
                "q_norm.weight": 1 + weights["q_norm.weight"], "k_norm.weight": 1 + weights["k_norm.weight"]}
    ours.load_state_dict(weights)
    positions = torch.arange(LENGTH).expand(2, -1)
    _compare(ours, lambda x: theirs(x, rotary(x, positions), _causal_mask(LENGTH))[0],
             "gated attention vs Qwen3NextAttention")
