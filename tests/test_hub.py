"""Checkpoints in and out of transformers: tiny random models of each family, built and saved by transformers
itself (no downloads), load with `from_pretrained` to equal logits and greedy continuations; our
`save_pretrained` folders load back into transformers with equal logits; other layouts round-trip in
mixerzoo's own format; bad checkpoints are refused naming the key."""

from __future__ import annotations

import json

import pytest
import torch

import mixerzoo as mz
from mixerzoo import from_pretrained
from mixerzoo.testing import assert_rel_close

transformers = pytest.importorskip("transformers", reason="transformers is not installed: no checkpoints to read")

# float32 logits of a 16-token prompt through the same arithmetic in another order: rounding ~1e-6
# relative; the bound 1e-4.
TOL = 1e-4
VOCAB, WIDTH, LAYERS = 97, 32, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6)


def _configs():
    from transformers import (BambaConfig, FalconH1Config, JambaConfig, Lfm2Config, LlamaConfig, MiniMaxConfig, Mamba2Config, MambaConfig,
                              Qwen2Config, Qwen3Config, Qwen3NextConfig, RecurrentGemmaConfig)

    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**COMMON, tie_word_embeddings=False),
        "qwen3_next": Qwen3NextConfig(**COMMON, tie_word_embeddings=False, linear_num_key_heads=2,
                                      linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                                      linear_conv_kernel_dim=4, num_experts=0, partial_rotary_factor=0.25,
                                      layer_types=["linear_attention"] * 3 + ["full_attention"]),
        "qwen3_next_moe": Qwen3NextConfig(**COMMON, tie_word_embeddings=False, linear_num_key_heads=2,
                                          linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                                          linear_conv_kernel_dim=4, partial_rotary_factor=0.25, num_experts=6,
                                          num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, mlp_only_layers=[2], norm_topk_prob=False,
                                          layer_types=["linear_attention"] * 3 + ["full_attention"]),
        "lfm2": Lfm2Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=72, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, conv_L_cache=3, conv_bias=True,
                           block_multiple_of=8, layer_types=["conv", "conv", "full_attention", "conv"]),
        "bamba": BambaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4,
                             mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                             mamba_chunk_size=8, tie_word_embeddings=False),
        "jamba": JambaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                             expert_layer_period=2, expert_layer_offset=0, num_experts=4, num_experts_per_tok=2,
                             mamba_d_state=8, mamba_dt_rank=4, mamba_proj_bias=True,
                             tie_word_embeddings=False),
        "minimax": MiniMaxConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, block_size=8,
                                 layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                                 full_attn_alpha_factor=1.5, full_attn_beta_factor=0.8, linear_attn_alpha_factor=1.2,
                                 linear_attn_beta_factor=0.7, mlp_alpha_factor=1.1, mlp_beta_factor=0.9,
                                 tie_word_embeddings=False),
        "recurrent_gemma": RecurrentGemmaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=96,
                                                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=1,
                                                attention_window_size=8, block_types=["recurrent", "recurrent", "attention"]),
        "falcon_h1": FalconH1Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_d_ssm=48,
                                    mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8,
                                    mamba_rms_norm=True, embedding_multiplier=2.5, lm_head_multiplier=0.7,
                                    key_multiplier=1.3, attention_in_multiplier=0.9, attention_out_multiplier=1.1,
                                    ssm_in_multiplier=1.2, ssm_out_multiplier=0.8, mlp_multipliers=[1.4, 0.6],
                                    ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.3]),
        "falcon_h1_plain": FalconH1Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_n_heads=4,
                                          mamba_d_state=8, mamba_chunk_size=8, mamba_rms_norm=False,
                                          tie_word_embeddings=True),
        "mamba": MambaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, state_size=8,
                             time_step_rank=4, tie_word_embeddings=True, use_mambapy=False),
        "mamba2": Mamba2Config(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_heads=4, head_dim=16,
                               state_size=8, n_groups=2, expand=2, tie_word_embeddings=False),
    }


# Each case's family (qwen3_next_moe: Qwen3-Next with experts and a gated shared expert in all but layer 2;
# recurrent_gemma: RG-LRU, RG-LRU, local attention with a window of 8 inside the 16-token prompt, RG-LRU;
# falcon_h1: a Mamba2 width that is not expand x hidden, its norm before the gate, and every µP multiplier
# away from 1, so each fold into a weight is checked; falcon_h1_plain: no norm on the gated output, tied embeddings).
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_next": "qwen3_next",
            "qwen3_next_moe": "qwen3_next", "lfm2": "lfm2", "bamba": "bamba", "jamba": "jamba", "minimax": "minimax", "recurrent_gemma": "recurrent_gemma",
            "falcon_h1": "falcon_h1", "falcon_h1_plain": "falcon_h1", "mamba": "mamba", "mamba2": "mamba2"}
# Families whose RMSNorms scale by (1 + weight): their norm weights are drawn around 0, the others' around 1.
ZERO_CENTRED_NORMS = {"qwen3_next", "recurrent_gemma"}


def _transformers_class(case: str):
    """transformers' own causal-LM class of the case's family (not the Auto mapping: importing fla re-registers
    model types such as mamba2 there with fla's Triton models)."""
    from mixerzoo.blocks.hub import FAMILIES as HUB_FAMILIES

    return getattr(transformers, HUB_FAMILIES[FAMILIES[case]].architecture)


def _theirs(family: str):
    """A transformers model of the case `family` with random weights of unit scale (its own init is 0.02:
    logits near uniform, greedy choices near ties)."""
    torch.manual_seed(0)
    model = _transformers_class(family)(_configs()[family]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2)
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 0.2) + (1.0 if "norm" in name and FAMILIES[family] not in ZERO_CENTRED_NORMS else 0.0))
    return model


def _prompt():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transformers_checkpoint_loads_to_equal_logits_and_greedy_tokens(family, tmp_path):
    theirs = _theirs(family)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    prompt = _prompt()
    with torch.no_grad():
        expected = theirs(prompt).logits
        got, _ = ours(prompt)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{family}: logits relative error {err:.2e}")
    assert_rel_close(got, expected, TOL, what=f"{family} logits")
    theirs.generation_config.eos_token_id = None  # greedy for all 8 tokens, as ours without stop tokens
    with torch.no_grad():
        their_tokens = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                       do_sample=False, pad_token_id=0)[:, 16:]
    our_tokens = mz.generate(ours, prompt, max_new_tokens=8)
    assert torch.equal(our_tokens, their_tokens), f"{family}: greedy continuations differ"
    assert "layers:" in ours.spec.to_yaml()  # the layout prints as the YAML a user could have written


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_writes_a_folder_transformers_loads_to_equal_logits(family, tmp_path):
    theirs = _theirs(family)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(tmp_path / "theirs").eval()
    assert ours.save_pretrained(tmp_path / "ours") == FAMILIES[family]
    back = _transformers_class(family).from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    prompt = _prompt()
    with torch.no_grad():
        assert_rel_close(back(prompt).logits, ours(prompt)[0], TOL, what=f"{family} exported logits")
    assert torch.equal(from_pretrained(tmp_path / "ours").embed.weight, ours.embed.weight)


@pytest.mark.parametrize("name", ["transformer", "jamba", "minimax"])
def test_a_recipe_a_family_holds_exports_to_a_folder_transformers_loads_to_equal_logits(name, tmp_path):
    from mixerzoo.blocks.hub import FAMILIES as HUB_FAMILIES, family_of

    torch.manual_seed(0)
    ours = mz.Decoder(mz.registry.recipe(name, "tiny")).eval()
    family = family_of(ours.spec)
    assert family != "mixerzoo", f"{name}: no transformers family holds the recipe"
    assert ours.save_pretrained(tmp_path) == family
    back = getattr(transformers, HUB_FAMILIES[family].architecture).from_pretrained(tmp_path, attn_implementation="eager").eval()
    prompt = torch.randint(0, ours.spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = ours(prompt)[0], back(prompt).logits
    print(f"{name} as {family}: logits relative error {((got - expected).abs().max() / expected.abs().max()).item():.2e}")
    assert_rel_close(expected, got, TOL, what=f"{name} exported as {family}")


def test_a_layout_without_a_transformers_twin_round_trips_in_mixerzoos_format(tmp_path):
    torch.manual_seed(0)
    model = mz.Decoder(mz.registry.recipe("infinitevl", "tiny")).eval()
    assert model.save_pretrained(tmp_path) == "mixerzoo"
    again = from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, model.spec.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(prompt)[0], model(prompt)[0])
    assert again.spec == model.spec


def test_bad_checkpoints_are_refused_naming_the_key(tmp_path):
    theirs = _theirs("qwen2")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_bigcode"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt_bigcode' is not one mixerzoo reads"):
        from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": LAYERS + 1}))
    with pytest.raises(KeyError, match=r"gives no 'layers\.4\."):
        from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": LAYERS - 1}))
    with pytest.raises(KeyError, match=r"'layers\.3\..*' maps to no weight"):
        from_pretrained(tmp_path)



def test_a_checkpoint_with_fewer_experts_than_its_config_is_refused_naming_the_expert(tmp_path):
    _theirs("qwen3_next_moe").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_experts": 8}))
    with pytest.raises(KeyError, match=r"gives no 'model\.layers\.0\.mlp\.experts\.6\.gate_proj\.weight'.*8 experts"):
        from_pretrained(tmp_path)
