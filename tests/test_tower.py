"""The digit-reading vision tower that the VLM recall studies pretrain, cache, share and freeze."""

import pytest
import torch

from mixerzoo.ablate.studies import RunConfig
from mixerzoo.ablate.visual_study import VisualRecallSettings, train_and_score, vlm_spec
from mixerzoo.tasks import tower as tower_module
from mixerzoo.tasks.tower import DigitReader, cached_digit_tower, digit_batch, pretrain_digit_tower
from mixerzoo.tasks.visual import VisualRecallConfig, make_visual_recall, sized_processor

SPEC = vlm_spec(RunConfig(study="visual-recall", recipe="gdn"))
PROCESSOR = sized_processor(SPEC.processor, 28)
FONT = VisualRecallConfig(vocab_size=SPEC.decoder.vocab_size, n_images=2, filler=2)


def test_pretraining_learns_to_read_digits():
    """60 steps on rendered glyphs read held-out images far above chance (0.1); a bug in the labels,
    the pooling or the head would leave it near chance."""
    _, accuracy = pretrain_digit_tower(SPEC.vision, FONT, PROCESSOR, steps=60, seed=0, eval_images=128)
    assert accuracy >= 0.3, accuracy


def test_reader_logits_have_one_head_per_digit():
    task = FONT.model_copy(update={"digits": 2, "font_size": 12})
    pixels, grid, digits = digit_batch(task, PROCESSOR, 3, seed=0, split="train")
    assert digits.shape == (3, 2)
    assert DigitReader(SPEC.vision, 2)(pixels, grid).shape == (3, 2, 10)


def test_cache_builds_once_per_key(tmp_path, monkeypatch):
    """The second call with the same key reads the file (pretraining is not called again); another seed
    is another tower."""
    first, accuracy = cached_digit_tower(tmp_path, SPEC.vision, FONT, PROCESSOR, steps=2, seed=0)
    monkeypatch.setattr(tower_module, "pretrain_digit_tower", lambda *a, **k: pytest.fail("pretrained again"))
    again, accuracy_again = cached_digit_tower(tmp_path, SPEC.vision, FONT, PROCESSOR, steps=2, seed=0)
    assert accuracy_again == accuracy and first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(pytest.fail.Exception, match="pretrained again"):
        cached_digit_tower(tmp_path, SPEC.vision, FONT, PROCESSOR, steps=2, seed=1)


def test_study_run_loads_and_freezes_the_tower(tmp_path):
    """A pretrained-tower run trains the decoder around the cached tower and leaves the tower's weights
    exactly as cached; a scratch run trains the tower too."""
    run = RunConfig(study="visual-recall", recipe="gdn", seed=3)
    scratch = tmp_path / ".scratch"
    make = lambda n, seed, split: make_visual_recall(FONT.model_copy(update={"scan_split": split}), n, seed, PROCESSOR)  # noqa: E731
    for mode in ("pretrained", "scratch"):
        settings = VisualRecallSettings(steps=3, batch_size=2, eval_examples=2, warmup_steps=0, tower=mode,
                                        tower_steps=2)
        model, trained, _, _, tower = train_and_score(run, SPEC, settings, FONT, PROCESSOR, make, scratch)
        assert trained["steps"] == 3 and tower["tower"] == mode
        if mode == "pretrained":
            cached, accuracy = cached_digit_tower(tmp_path / ".towers", SPEC.vision, FONT, PROCESSOR, steps=2, seed=3)
            assert tower["tower_accuracy"] == accuracy
            assert all(torch.equal(model.visual.state_dict()[k], cached[k]) for k in cached)
            assert not any(p.requires_grad for p in model.visual.parameters())
        else:
            assert tower["tower_accuracy"] is None
            assert all(p.requires_grad for p in model.visual.parameters())
