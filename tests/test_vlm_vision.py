"""Vision tower: parity with Hugging Face's Qwen2.5-VL vision model (its state_dict loaded strictly),
parameter names and count of the paper config, batched segments, independence of images, errors."""

import contextlib
import importlib

import pytest
import torch
from hypothesis import given, strategies as st
from pydantic import ValidationError

from mixerzoo.vlm.vision import VisionConfig, VisionTower

vision_module = importlib.import_module("mixerzoo.vlm.vision")

# Several windows per frame: window 56 px = 2 merged tokens = 4 patches a side; blocks 1 and 3 full.
TINY = dict(
    depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=48, window_size=56,
    fullatt_block_indexes=(1, 3),
)
PATCH_DIM = 3 * 2 * 14 * 14
PAPER_VISION_PARAMETERS = 668_684_288  # reference/infinitevl.md: Qwen2.5-VL-3B's vision tower

GRIDS = {
    "one_image": [[1, 8, 12]],
    "two_images": [[1, 8, 12], [1, 6, 4]],
    "video_t2": [[2, 8, 8]],
    "edge_windows": [[1, 10, 14]],  # 5 x 7 merged tokens: windows of 2x2, 2x1, 1x2 and 1x1
}


def _pixels(grid: list[list[int]], seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grid)
    n = int(grid_thw.prod(dim=1).sum())
    return torch.randn(n, PATCH_DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype), grid_thw


def _random_state_dict(tower: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Weights ~ 1/sqrt(fan_in); biases and norm gains off their init (ones), so swapped norms show."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in tower.state_dict().items():
        scale = p[0].numel() ** -0.5 if p.dim() > 1 else 0.2
        shift = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")) else 0.0
        state[name] = torch.randn(p.shape, generator=gen) * scale + shift
    return state


def _hf_modeling():
    pytest.importorskip("transformers", reason="transformers is the parity oracle (pip install transformers)")
    return importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")


def _hf_tower(state: dict, dtype: torch.dtype, attn_implementation: str):
    from transformers import Qwen2_5_VLVisionConfig

    modeling = _hf_modeling()
    config = Qwen2_5_VLVisionConfig(**{**TINY, "fullatt_block_indexes": list(TINY["fullatt_block_indexes"])})
    hf = modeling.Qwen2_5_VisionTransformerPretrainedModel._from_config(
        config, attn_implementation=attn_implementation
    )
    hf.load_state_dict(state, strict=True)
    return hf.to(dtype).eval()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return _random_state_dict(VisionTower(VisionConfig(**TINY)), seed=0)


@pytest.fixture(scope="module")
def hf_float32(weights):
    # eager: a plain matmul + softmax, independent of the SDPA kernel our torch backend uses.
    return _hf_tower(weights, torch.float32, "eager")


@pytest.fixture(scope="module")
def hf_float64(weights):
    # sdpa: HF's eager path computes the softmax in float32 whatever the input dtype.
    return _hf_tower(weights, torch.float64, "sdpa")


def _ours(weights: dict, dtype: torch.dtype, backend: str = "auto") -> VisionTower:
    tower = VisionTower(VisionConfig(**TINY, backend=backend))
    tower.load_state_dict(weights, strict=True)
    return tower.to(dtype).eval()


@contextlib.contextmanager
def _hf_without_float32_casts():
    """HF's tower upcasts to float32 inside RMSNorm, the rotary tables and the rotary product, which
    for float64 inputs is a downcast. Lift exactly those three casts (same formulas, in the input
    dtype), so a float64 comparison checks the structure (windows, order, merger) to 1e-10."""
    modeling = _hf_modeling()

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary_tables(self, x, position_ids):
        half = self.config.hidden_size // self.config.num_heads // 2  # frequencies split between h and w
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq  # [N, 2, head_dim // 4]
        return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())

    def rotate(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return q * cos + modeling.rotate_half(q) * sin, k * cos + modeling.rotate_half(k) * sin

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling.Qwen2_5_VLRMSNorm, "forward", rms_norm)
        patch.setattr(modeling.Qwen2_5_VLVisionRotaryEmbedding, "forward", rotary_tables)
        patch.setattr(modeling, "apply_rotary_pos_emb_vision", rotate)
        yield


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_matches_hf_float32(grid, weights, hf_float32):
    pixels, grid_thw = _pixels(grid, seed=1)
    with torch.no_grad():
        expected = hf_float32(pixels, grid_thw).pooler_output
        got = _ours(weights, torch.float32)(pixels, grid_thw)
    assert got.shape == (int(grid_thw.prod(dim=1).sum()) // 4, TINY["out_hidden_size"])
    # float32, same math in a different summation order (SDPA vs matmul-softmax, float64 vs float32
    # rotary tables, fused vs unfused RMSNorm): observed differences are ~3e-6 on outputs of size ~2.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_matches_hf_float64(grid, backend, weights, hf_float64):
    pixels, grid_thw = _pixels(grid, seed=2, dtype=torch.float64)
    with torch.no_grad(), _hf_without_float32_casts():
        expected = hf_float64(pixels, grid_thw).pooler_output
    with torch.no_grad():
        got = _ours(weights, torch.float64, backend)(pixels, grid_thw)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@st.composite
def grids(draw):
    """1 to 3 images or videos, up to 2 frame groups, sides of 2 to 18 patches (even)."""
    side = st.integers(1, 9).map(lambda s: 2 * s)
    return [[draw(st.integers(1, 2)), draw(side), draw(side)] for _ in range(draw(st.integers(1, 3)))]


@given(grid=grids(), seed=st.integers(0, 2**31 - 1))
def test_matches_hf_float64_on_random_grids(grid, seed, weights, hf_float64):
    pixels, grid_thw = _pixels(grid, seed=seed, dtype=torch.float64)
    with torch.no_grad(), _hf_without_float32_casts():
        expected = hf_float64(pixels, grid_thw).pooler_output
    with torch.no_grad():
        got = _ours(weights, torch.float64)(pixels, grid_thw)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_images_are_independent_and_keep_their_order():
    tower = _ours(_random_state_dict(VisionTower(VisionConfig(**TINY)), seed=3), torch.float64)
    grid = [[2, 6, 10], [1, 10, 14], [1, 2, 2]]
    pixels, grid_thw = _pixels(grid, seed=4, dtype=torch.float64)
    with torch.no_grad():
        together = tower(pixels, grid_thw)
        alone = [tower(p, g[None]) for p, g in zip(pixels.split(grid_thw.prod(dim=1).tolist()), grid_thw)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-12, atol=1e-12)


def test_segments_of_equal_length_share_one_attention_call(monkeypatch):
    calls = []
    real_attention = vision_module.attention

    def recording_attention(q, k, v, **kwargs):
        calls.append((q.shape[0], q.shape[1], kwargs["causal"]))
        return real_attention(q, k, v, **kwargs)

    monkeypatch.setattr(vision_module, "attention", recording_attention)
    tower = VisionTower(VisionConfig(**TINY)).eval()
    # 5 x 7 merged tokens per frame, windows of 2 merged a side: per frame 6 windows of 16 patches,
    # 5 of 8 and 1 of 4; the video's 2 frames and the image make 3 frames of 140 patches.
    pixels, grid_thw = _pixels([[2, 10, 14], [1, 10, 14]], seed=5)
    with torch.no_grad():
        tower(pixels, grid_thw)
    window_calls = [(3 * 1, 4, False), (3 * 5, 8, False), (3 * 6, 16, False)]
    full_calls = [(3, 140, False)]
    assert sorted(calls) == sorted(2 * window_calls + 2 * full_calls)


def test_paper_config_parameter_count():
    with torch.device("meta"):
        tower = VisionTower(VisionConfig())
    assert sum(p.numel() for p in tower.parameters()) == PAPER_VISION_PARAMETERS


def test_paper_config_parameter_names_and_shapes_equal_hf():
    modeling = _hf_modeling()
    from transformers import Qwen2_5_VLVisionConfig

    config = VisionConfig()
    hf_config = Qwen2_5_VLVisionConfig(
        **config.model_dump(exclude={"rms_norm_eps", "rope_theta", "backend", "fullatt_block_indexes"}),
        fullatt_block_indexes=list(config.fullatt_block_indexes),
    )
    with torch.device("meta"):
        hf = modeling.Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config)
        ours = VisionTower(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert hf_config.rope_parameters["rope_theta"] == config.rope_theta


def test_patch_count_mismatch_names_both_numbers():
    tower = VisionTower(VisionConfig(**TINY))
    pixels, _ = _pixels([[1, 8, 12]], seed=6)
    with pytest.raises(ValueError, match=r"grid_thw describes 100 patches .* pixel_values has 96 rows"):
        tower(pixels, torch.tensor([[1, 10, 10]]))


@pytest.mark.parametrize(
    ("pixels", "grid", "message"),
    [
        (torch.zeros(96, PATCH_DIM - 1), [[1, 8, 12]], r"pixel_values must be \[N, 1176\]"),
        (torch.zeros(96, PATCH_DIM), [[1, 8]], r"grid_thw must be an integer \[n, 3\]"),
        (torch.zeros(96, PATCH_DIM), [[1.0, 8.0, 12.0]], r"grid_thw must be an integer \[n, 3\]"),
        (torch.zeros(96, PATCH_DIM), [[0, 8, 12]], r"rows must be 3 positive ints"),
        (torch.zeros(63, PATCH_DIM), [[1, 7, 9]], r"multiples of spatial_merge_size 2"),
    ],
)
def test_bad_inputs_raise_clear_errors(pixels, grid, message):
    tower = VisionTower(VisionConfig(**TINY))
    with pytest.raises(ValueError, match=message):
        tower(pixels, torch.tensor(grid))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 3}, r"num_heads \(3\) must divide hidden_size \(32\)"),
        ({"num_heads": 16}, r"head_dim .* = 2 must be a multiple of 4"),
        ({"fullatt_block_indexes": (1, 4)}, r"fullatt_block_indexes \[4\] out of range for depth 4"),
        ({"window_size": 42}, r"window_size \(42\) must be a multiple of .* = 28"),
        ({"depth": 0}, r"depth"),
        ({"windowsize": 56}, r"windowsize"),
    ],
)
def test_config_rejects_bad_sizes(change, message):
    with pytest.raises(ValidationError, match=message):
        VisionConfig(**{**TINY, **change})
