"""AdamW parameter groups: weight decay on matrices only, in the task loop and the training loop alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixerzoo.optim
from mixerzoo.blocks import Decoder, LayoutSpec
from mixerzoo.optim import NO_WEIGHT_DECAY, weight_decay_groups
from mixerzoo.registry.recipes import layout
from mixerzoo.tasks.loop import fit


def _spec(tie: bool) -> LayoutSpec:
    data = layout("tiny", pattern="FGMS").model_dump(mode="json")
    data["layers"] = [{**layer, "mlp": {"type": "swiglu", "hidden": 32, "bias": True}} for layer in data["layers"]]
    return LayoutSpec.model_validate({**data, "tie_embeddings": tie})


EXEMPT_SUFFIXES = ("A_log", "dt_bias", ".D", "bias", "norm.weight", "embed.weight")


@pytest.mark.parametrize("tie", [True, False])
def test_only_matrices_decay(tie):
    model = Decoder(_spec(tie))
    decayed, kept = (group["params"] for group in weight_decay_groups(model, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(decayed) + len(kept) == len(list(model.parameters()))  # each parameter once (a tied head too)
    for p in decayed:
        assert p.ndim >= 2 and not names[id(p)].endswith(EXEMPT_SUFFIXES), names[id(p)]
    for p in kept:
        assert p.ndim < 2 or names[id(p)] == "embed.weight", names[id(p)]
    kept_names = {names[id(p)] for p in kept}
    for expected in ("layers.1.mixer.A_log", "layers.1.mixer.dt_bias", "layers.2.mixer.D", "layers.0.mixer.q_proj.bias",
                     "layers.0.mixer_norm.weight", "layers.0.mlp.down_proj.bias", "norm.weight", "embed.weight"):
        assert expected in kept_names
    assert ("lm_head.weight" in {names[id(p)] for p in decayed}) is (not tie)


def test_marked_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    setattr(model[0].weight, NO_WEIGHT_DECAY, True)  # fla / mamba_ssm's mark, honoured for plugins
    model[1].weight.requires_grad_(False)
    groups = weight_decay_groups(model, 0.5)
    assert [len(g["params"]) for g in groups] == [3]  # nothing left to decay: that group is dropped
    assert groups[0]["weight_decay"] == 0.0


def test_fit_decays_matrices_but_not_the_rest():
    """With a zero loss gradient, one AdamW step shrinks exactly the decayed tensors by (1 - lr * wd)."""
    torch.manual_seed(0)
    model = Decoder(_spec(tie=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decayed = {id(p) for p in weight_decay_groups(model, 0.1)[0]["params"]}

    class ZeroLoss(nn.Module):  # the model's parameters under a loss whose gradient is zero
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, **_):
            return self.inner(input_ids)[0] * 0.0, None

    fit(ZeroLoss(), lambda step: {"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                 "labels": torch.zeros(1, 4, dtype=torch.long)},
        steps=1, lr=0.5, weight_decay=0.1, schedule="constant")
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * 0.1 if id(p) in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0, msg=name)


def test_training_loop_uses_the_groups(tmp_path, monkeypatch):
    from mixerzoo.train import TrainConfig, train

    calls = []
    original = mixerzoo.optim.weight_decay_groups

    def recording(model, weight_decay):
        groups = original(model, weight_decay)
        calls.append(groups)
        return groups

    monkeypatch.setattr("mixerzoo.train.loop.weight_decay_groups", recording)
    config = TrainConfig.model_validate(dict(
        stage="sft", out_dir=tmp_path / "run", student={"recipe": "gdn", "vlm": False}, steps=1, micro_batch_size=2,
        data={"source": "mqar", "task": {"seq_len": 16, "n_pairs": 2, "vocab_size": 256}, "n_examples": 4},
        train=["all"], progress=False, optim={"lr": 1e-3, "weight_decay": 0.1}))
    train(config)
    assert len(calls) == 1 and [g["weight_decay"] for g in calls[0]] == [0.1, 0.0]
    assert all(p.ndim < 2 for p in calls[0][1]["params"][1:])  # after the embedding: vectors only
