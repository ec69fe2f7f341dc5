"""VLMs: Hugging Face Qwen2.5-VL parity, InfiniteVL-release import, conversion, recipes, streaming."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixerzoo.blocks import continue_stream
from mixerzoo.mixers import Attention, GatedDeltaNet
from mixerzoo.vlm.hf import convert, load_pretrained
from mixerzoo.vlm.model import VLM, generate_vlm, load_vlm, save_vlm
from mixerzoo.vlm.recipes import list_vlm_recipes, vlm_recipe
from mixerzoo.vlm.stream import StreamSession

IMAGE, VIDEO, START, END = 990, 991, 992, 993


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random Qwen2.5-VL from transformers, saved as a checkpoint directory."""
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
    torch.manual_seed(0)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, tokens_per_second=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    )
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("qwen") / "ckpt"
    model.save_pretrained(path)
    return model, path


def _media_prompt(*blocks):
    """input_ids [1, T] with text around each (kind, merged token count) block."""
    ids = [5, 6]
    for kind, n in blocks:
        ids += [START] + [IMAGE if kind == "image" else VIDEO] * n + [END, 7, 8]
    return torch.tensor([ids])


def _hf_logits(model, ids, **media):
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    with torch.no_grad():
        return model(input_ids=ids, mm_token_type_ids=types, **media).logits


CASES = {
    "text": ([], {}),
    "one image": ([("image", 6)], dict(pixel_values=(24,), image_grid_thw=[[1, 4, 6]])),
    "two images": ([("image", 6), ("image", 4)], dict(pixel_values=(40,), image_grid_thw=[[1, 4, 6], [1, 4, 4]])),
    # 0.5 s per temporal patch (2 tokens / s): temporal positions stay within the block's
    # spatial extent. Past it, transformers 5.x starts the next text at block start + max(h, w)
    # while Qwen's rule (ours) uses max position + 1; tests/test_vlm_positions.py pins that.
    "video": ([("video", 8)], dict(pixel_values_videos=(32,), video_grid_thw=[[2, 4, 4]], second_per_grid_ts=[0.5])),
}


def _media(spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    media = {}
    for key, value in spec.items():
        if key.startswith("pixel_values"):
            media[key] = torch.randn(value[0], 3 * 2 * 14 * 14, generator=gen)
        elif key == "second_per_grid_ts":
            media[key] = torch.tensor(value)
        else:
            media[key] = torch.tensor(value)
    return media


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_checkpoint, case):
    hf, path = hf_checkpoint
    ours = load_pretrained(path)
    blocks, media_spec = CASES[case]
    ids, media = _media_prompt(*blocks), _media(media_spec)
    expected = _hf_logits(hf, ids, **media)
    with torch.no_grad():
        got, _ = ours(ids, **media)
    # float32, same math in a different order: 1e-4 relative to the largest logit.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_chunked_prefill_and_greedy_decode_match_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = load_pretrained(path)
    ids, media = _media_prompt(("image", 6), ("video", 8)), _media({**CASES["one image"][1], **CASES["video"][1]})
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, mm_token_type_ids=types, max_new_tokens=20, do_sample=False,
                               min_new_tokens=20, **media)[0, ids.shape[1]:]
        logits, state = ours(ids, chunk_size=5, **media)
        got = torch.stack(list(continue_stream(ours, logits[:, -1], state, max_new_tokens=20)), 1)[0]
    assert got.tolist() == expected.tolist()
    assert generate_vlm(ours, ids, max_new_tokens=20, chunk_size=7, **media)[0].tolist() == expected.tolist()


def _release_checkpoint(hf_path, out, window=8):
    """The tiny checkpoint rewritten in the InfiniteVL release layout: layer_types, and fla
    GatedDeltaNet parameters under self_attn in the linear_attention layers."""
    layers = pytest.importorskip("fla.layers", reason="flash-linear-attention (fla.layers) is not installed")
    config = json.loads((hf_path / "config.json").read_text())
    tensors = load_file(hf_path / "model.safetensors")
    types = ["sliding_attention" if i % 4 == 0 else "linear_attention" for i in range(4)]
    config["text_config"].update(layer_types=types, use_sliding_window=True, sliding_window=window)
    torch.manual_seed(1)
    for i, kind in enumerate(types):
        if kind == "linear_attention":
            prefix = f"model.layers.{i}.self_attn."
            tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
            gdn = layers.GatedDeltaNet(hidden_size=64, num_heads=4, head_dim=16, expand_v=2, mode="chunk")
            tensors.update({prefix + k: v.contiguous() for k, v in gdn.state_dict().items()})
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, out / "model.safetensors")
    return tensors


def test_reads_the_infinitevl_release_layout(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    tensors = _release_checkpoint(path, tmp_path / "release")
    model = load_pretrained(tmp_path / "release")
    kinds = [(type(b.mixer).__name__, getattr(b.mixer.config, "window", None)) for b in model.decoder.layers]
    assert kinds == [("Attention", 8), ("GatedDeltaNet", None), ("GatedDeltaNet", None), ("GatedDeltaNet", None)]
    assert torch.equal(model.decoder.layers[1].mixer.A_log, tensors["model.layers.1.self_attn.A_log"])
    assert torch.equal(model.decoder.layers[2].mixer.q_conv1d.weight, tensors["model.layers.2.self_attn.q_conv1d.weight"])
    with torch.no_grad():
        logits, _ = model(_media_prompt(("image", 6)), **_media(CASES["one image"][1]))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("gdn_init", ["mimic", "attention"])
def test_convert_to_infinitevl_keeps_teacher_weights_and_round_trips(hf_checkpoint, tmp_path, gdn_init):
    _, path = hf_checkpoint
    teacher = load_pretrained(path)
    student = convert(teacher, "infinitevl", window=8, gdn_init=gdn_init)
    mixers = [type(b.mixer) for b in student.decoder.layers]
    assert mixers == [Attention, GatedDeltaNet, GatedDeltaNet, GatedDeltaNet]
    assert student.decoder.layers[0].mixer.config.window == 8
    kept = {k: v for k, v in teacher.state_dict().items() if not (k.startswith("decoder.layers.") and ".mixer." in k
                                                                  and not k.startswith("decoder.layers.0."))}
    for name, tensor in kept.items():
        assert torch.equal(student.state_dict()[name], tensor), name
    gdn, attention = student.decoder.layers[1].mixer, teacher.decoder.layers[1].mixer
    assert torch.equal(gdn.A_log, torch.zeros_like(gdn.A_log)) and not gdn.b_proj.weight.any()
    assert torch.equal(gdn.q_proj.weight, attention.q_proj.weight) == (gdn_init == "attention")
    save_vlm(student, tmp_path / "student.safetensors")
    again = load_vlm(tmp_path / "student.safetensors")
    ids = _media_prompt(("image", 6))
    with torch.no_grad():
        a, _ = student(ids, **_media(CASES["one image"][1]))
        b, _ = again(ids, **_media(CASES["one image"][1]))
    assert torch.equal(a, b)


def test_paper_vlm_parameter_counts():
    counts = {}
    for name in ("qwen2.5-vl", "infinitevl"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in VLM(vlm_recipe(name, "paper")).parameters())
    assert counts == {"qwen2.5-vl": 3_754_622_976, "infinitevl": 4_408_381_536}


@pytest.mark.parametrize("name", list_vlm_recipes())
def test_every_vlm_recipe_runs_an_image_chunked_like_one_call(name, tmp_path):
    torch.manual_seed(0)
    model = VLM(vlm_recipe(name, "tiny")).double().eval()
    p = model.spec.processor
    ids = torch.tensor([[1, 2, p.vision_start_id] + [p.image_pad_id] * 6 + [p.vision_end_id, 3, 4, 5]])
    media = dict(pixel_values=torch.randn(24, 1176, dtype=torch.float64), image_grid_thw=torch.tensor([[1, 4, 6]]))
    with torch.no_grad():
        one, state = model(ids, **media)
        chunked, chunked_state = model(ids, chunk_size=3, **media)
        torch.testing.assert_close(chunked, one, rtol=1e-9, atol=1e-9)
        state.save(tmp_path / "s.safetensors", model.spec)
        loaded = model.load_state(tmp_path / "s.safetensors")
        nxt = torch.tensor([[6, 7]])
        assert torch.equal(model(nxt, loaded)[0], model(nxt, state)[0])


def test_stream_keeps_constant_state_and_ask_leaves_it_untouched(tmp_path):
    torch.manual_seed(0)
    session = StreamSession(VLM(vlm_recipe("infinitevl", "tiny")).eval(), frame_size=112)
    frames = np.random.default_rng(0).integers(0, 255, (40, 120, 160, 3), dtype=np.uint8)
    session.push_frames(frames[:30])
    assert len(set(session.stats.state_nbytes)) == 1, "infinitevl's state must not grow with frames"
    before = [{k: t.clone() for k, t in s.tensors().items()} for s in session.state.decoder.layers]
    answer = session.ask([1, 2, 3], max_new_tokens=4)
    assert len(answer) == 4
    for saved, layer in zip(before, session.state.decoder.layers):
        assert all(torch.equal(saved[k], t) for k, t in layer.tensors().items())
    session.save(tmp_path / "memory.safetensors")
    resumed = StreamSession(session.model, frame_size=112)
    resumed.load(tmp_path / "memory.safetensors")
    session.push_frames(frames[30:])
    resumed.push_frames(frames[30:])
    assert session.ask([4, 5], max_new_tokens=6) == resumed.ask([4, 5], max_new_tokens=6)


def test_full_attention_stream_grows_for_contrast():
    session = StreamSession(VLM(vlm_recipe("qwen2.5-vl", "tiny")).eval(), frame_size=56)
    session.push_frames(np.zeros((5, 56, 56, 3), dtype=np.uint8))
    sizes = session.stats.state_nbytes
    assert all(b > a for a, b in zip(sizes, sizes[1:]))


def test_left_padded_vlm_batch_generates_like_each_prompt_alone():
    torch.manual_seed(0)
    model = VLM(vlm_recipe("infinitevl", "tiny")).double().eval()
    p = model.spec.processor
    prompts = [[1, 2, p.vision_start_id] + [p.image_pad_id] * 6 + [p.vision_end_id, 3], [4, p.vision_start_id]
               + [p.image_pad_id] * 4 + [p.vision_end_id, 5, 6, 7, 8, 9]]
    grids = [torch.tensor([[1, 4, 6]]), torch.tensor([[1, 4, 4]])]
    pixels = [torch.randn(24, 1176, dtype=torch.float64), torch.randn(16, 1176, dtype=torch.float64)]
    width = max(map(len, prompts)) + 2
    ids = torch.zeros(2, width, dtype=torch.long)
    valid = torch.zeros(2, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], valid[row, width - len(prompt):] = torch.tensor(prompt), True
    batched = generate_vlm(model, ids, valid=valid, max_new_tokens=8, pixel_values=torch.cat(pixels),
                           image_grid_thw=torch.cat(grids))
    for row, prompt in enumerate(prompts):
        alone = generate_vlm(model, torch.tensor([prompt]), max_new_tokens=8, pixel_values=pixels[row],
                             image_grid_thw=grids[row])
        assert batched[row].tolist() == alone[0].tolist()


@pytest.mark.parametrize("ids, message", [([[1, 2, 256]], r"VLM: token ids must be in \[0, 256\), got 1\.\.256"),
                                          ([[-1, 2]], r"VLM: token ids must be in \[0, 256\), got -1\.\.2"),
                                          ([[1.0, 2.0]], "VLM: input_ids must be an integer tensor"),
                                          ([1, 2], r"VLM: input_ids must be \[B, T\]")])
def test_bad_token_ids_name_the_model_and_range(ids, message):
    """Out-of-vocabulary ids are a clear error, not an IndexError from the embedding."""
    model = VLM(vlm_recipe("gdn", "tiny"))
    with pytest.raises(ValueError, match=message):
        model(torch.tensor(ids))
