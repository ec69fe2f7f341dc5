"""mixerzoo.vlm.processor: parity with transformers' Qwen2.5-VL image processor, video patches, prompts.

transformers' video processor imports torchvision at module level, which this project
does not depend on, so videos are checked against the image processor frame by frame:
a video patch row holds temporal_patch_size consecutive frames at the same place, frame
2g + j in slot j of temporal group g, each slot equal to that frame's image patch.
"""

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from mixerzoo.vlm.processor import (
    ProcessorConfig,
    VideoFrames,
    expand_vision_tokens,
    process_images,
    process_video,
    read_video,
    smart_resize,
)

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

CFG = ProcessorConfig()


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _oracle(images, **kwargs):
    out = hf_pil.Qwen2VLImageProcessorPil(**kwargs)(images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def test_defaults_match_transformers():
    hf = hf_pil.Qwen2VLImageProcessorPil()
    assert (CFG.min_pixels, CFG.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    assert (CFG.patch_size, CFG.temporal_patch_size, CFG.merge_size) == (
        hf.patch_size, hf.temporal_patch_size, hf.merge_size)
    assert list(CFG.image_mean) == list(hf.image_mean) and list(CFG.image_std) == list(hf.image_std)
    assert hf.resample == Image.BICUBIC and hf.rescale_factor == 1 / 255
    # Qwen2VLVideoProcessor (torchvision only) defaults: size {shortest_edge: 128*28*28, longest_edge: 28*28*768}
    assert (CFG.video_min_pixels, CFG.video_max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
    assert CFG.patch_dim == 1176 and CFG.factor == 28


@pytest.mark.parametrize(
    "height, width",
    [(20, 30), (57, 131), (1200, 1000), (224, 224), (33, 3000), (41, 70)],
    ids=["tiny-upscaled", "odd-aspect", "large-downscaled", "square", "wide", "round-half-even"],
)
def test_images_match_transformers(height, width):
    image = _random_image(height, width, seed=height)
    ours, grid = process_images(image)
    want, want_grid = _oracle([Image.fromarray(image)])
    assert grid.dtype == torch.long and torch.equal(grid, want_grid)
    assert ours.dtype == torch.float32 and ours.shape == want.shape
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)  # bit-exact in practice: same float32 steps


def test_several_images_and_input_kinds():
    arrays = [_random_image(50, 90, 1), _random_image(300, 200, 2)]
    rgba = Image.fromarray(_random_image(64, 64, 3)).convert("RGBA")
    rgba.putalpha(Image.fromarray(_random_image(64, 64, 4)[..., 0]))  # transparency composited on white
    gray = Image.fromarray(_random_image(70, 40, 5)).convert("L")
    images = [arrays[0], Image.fromarray(arrays[1]), rgba, gray]
    ours, grid = process_images(images)
    want, want_grid = _oracle([Image.fromarray(arrays[0]), Image.fromarray(arrays[1]), rgba, gray])
    assert torch.equal(grid, want_grid)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    stacked, stacked_grid = process_images(np.stack([arrays[0], arrays[0]]))  # [N, H, W, 3] is N images
    assert torch.equal(stacked, torch.cat([process_images(arrays[0])[0]] * 2))
    assert stacked_grid.tolist() == [[1, 4, 6], [1, 4, 6]]  # 50x90 -> 56x84


def test_custom_pixel_bounds_match_transformers():
    config = ProcessorConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    image = _random_image(400, 500, 7)
    ours, grid = process_images(image, config)
    want, want_grid = _oracle([Image.fromarray(image)], min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    assert torch.equal(grid, want_grid) and grid[0].prod() * 28 * 28 // 4 <= config.max_pixels
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_smart_resize_matches_transformers(height, width):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width)
        return
    h, w = smart_resize(height, width)
    assert (h, w) == hf_pil.smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280


def test_smart_resize_errors():
    with pytest.raises(ValueError, match="aspect ratio must be at most 200"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="exceeds"):
        smart_resize(100, 100, min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="below one 28x28 tile"):
        smart_resize(100, 100, min_pixels=10, max_pixels=500)


def test_image_errors():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        process_images(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        process_images(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(TypeError, match="PIL image or an HxWx3"):
        process_images(["not an image"])
    with pytest.raises(ValueError, match="at least one image"):
        process_images([])
    with pytest.raises(ValueError, match="aspect ratio"):
        process_images(np.zeros((2, 900, 3), dtype=np.uint8))


def test_config_rejects_bad_fields():
    with pytest.raises(ValidationError, match=r"unknown key .patch_sise. \(did you mean .patch_size.\?\)"):
        ProcessorConfig(patch_sise=14)
    with pytest.raises(ValidationError, match="exceeds"):
        ProcessorConfig(min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValidationError, match="must differ"):
        ProcessorConfig(image_pad_id=CFG.video_pad_id)
    with pytest.raises(ValidationError):
        CFG.patch_size = 16  # frozen


def test_video_frames_match_image_path():
    """Each temporal slot of each video patch row is that frame's image patch (with the video pixel bounds)."""
    frames = np.stack([_random_image(60, 80, seed=10 + i) for i in range(5)])  # T = 5: padded to 6
    ours, grid, second_per_grid_t = process_video(frames)
    h, w = smart_resize(60, 80, 28, min_pixels=CFG.video_min_pixels, max_pixels=CFG.video_max_pixels)
    assert grid.tolist() == [[3, h // 14, w // 14]] and second_per_grid_t == 1.0  # 2 frames / 2 fps
    per_t = h // 14 * (w // 14)
    video = ours.reshape(3, per_t, 3, 2, 14, 14)  # [grid_t, patches, C, frame, y, x]
    padded = list(frames) + [frames[-1]]
    bounds = dict(min_pixels=CFG.video_min_pixels, max_pixels=CFG.video_max_pixels)
    for i, frame in enumerate(padded):
        want, want_grid = _oracle([Image.fromarray(frame)], **bounds)
        assert want_grid.tolist() == [[1, h // 14, w // 14]]
        torch.testing.assert_close(video[i // 2, :, :, i % 2], want.reshape(per_t, 3, 2, 14, 14)[:, :, 0],
                                   atol=1e-5, rtol=0)


def test_video_input_kinds_and_fps():
    frames = np.stack([_random_image(100, 60, seed=20 + i) for i in range(4)])
    ours, grid, _ = process_video(frames)
    from_pil, pil_grid, spg = process_video([Image.fromarray(f) for f in frames], fps=4.0)
    assert torch.equal(ours, from_pil) and torch.equal(grid, pil_grid) and spg == 0.5
    still, still_grid, _ = process_video(np.stack([frames[0]] * 2))  # a still video is the image, repeated
    image, image_grid = process_images(frames[0], ProcessorConfig(min_pixels=CFG.video_min_pixels,
                                                                  max_pixels=CFG.video_max_pixels))
    assert torch.equal(still, image) and torch.equal(still_grid, image_grid)


def test_video_errors():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        process_video(np.zeros((10, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="at least one frame"):
        process_video(np.zeros((0, 10, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="one size"):
        process_video([Image.new("RGB", (30, 20)), Image.new("RGB", (20, 30))])
    with pytest.raises(ValueError, match="fps must be positive"):
        process_video(np.zeros((2, 28, 28, 3), dtype=np.uint8), fps=0)


def test_read_video_missing_pyav(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match=r"pip install mixerzoo\[video\]"):
        read_video("whatever.mp4")


def test_read_video(tmp_path):
    av = pytest.importorskip("av", reason="PyAV not installed (pip install mixerzoo[video])")
    path = tmp_path / "ramp.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 12 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames, fps = read_video(path)
    assert frames.shape == (20, 48, 64, 3) and frames.dtype == np.uint8 and fps == 10.0
    brightness = frames.reshape(20, -1).mean(1)
    assert np.all(np.diff(brightness) > 0)  # decoded in order (lossy codec: values are approximate)
    sampled, sampled_fps = read_video(path, fps=2.0)
    assert len(sampled) == 4 and sampled_fps == 2.0
    assert np.all(np.diff(sampled.reshape(4, -1).mean(1)) > 0)
    _, _, second_per_grid_t = process_video(sampled, fps=sampled_fps)
    assert second_per_grid_t == 1.0
    with pytest.raises(ValueError, match="fps must be positive"):
        read_video(path, fps=-1)


def test_expand_vision_tokens():
    image_grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    video_grid = [[2, 4, 4]]
    ids = expand_vision_tokens([[1, 2], "image", [3], "video", "image", torch.tensor([4])], image_grid, video_grid)
    s, e, ip, vp = CFG.vision_start_id, CFG.vision_end_id, CFG.image_pad_id, CFG.video_pad_id
    assert ids == [1, 2, s, *[ip] * 6, e, 3, s, *[vp] * 8, e, s, ip, e, 4]
    assert expand_vision_tokens([[5, 6]]) == [5, 6]
    n_pads = sum(math.prod(row) // 4 for row in image_grid.tolist())
    assert ids.count(ip) == n_pads


def test_expand_vision_tokens_errors():
    with pytest.raises(ValueError, match="2 image part.*1 row"):
        expand_vision_tokens(["image", "image"], [[1, 2, 2]])
    with pytest.raises(ValueError, match="0 video part.*1 row"):
        expand_vision_tokens([[1]], video_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="'image' or 'video'"):
        expand_vision_tokens(["audio"])
    with pytest.raises(TypeError, match="part 0"):
        expand_vision_tokens([3.5])
    with pytest.raises(ValueError, match="not divisible by merge_size"):
        expand_vision_tokens(["image"], [[1, 3, 2]])
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        expand_vision_tokens(["image"], torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match="text holds an image or video pad id"):
        expand_vision_tokens([[1, CFG.image_pad_id]])
    with pytest.raises(ValueError, match="3 positive ints"):
        expand_vision_tokens(["image"], [[1, 0, 2]])


def _write_video(path, n_frames: int, rate: int = 10) -> None:
    av = pytest.importorskip("av", reason="PyAV not installed (pip install mixerzoo[video])")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (7 * i) % 250, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _tracked(frames, seen: dict):
    """Yield `frames`, recording in `seen` how many were yielded and the most alive at once."""
    import weakref

    alive = []
    seen.update(count=0, most=0)
    for frame in frames:
        alive = [ref for ref in alive if ref() is not None] + [weakref.ref(frame)]
        seen.update(count=seen["count"] + 1, most=max(seen["most"], len(alive)))
        yield frame
        del frame


def _most_frames_alive(frames) -> tuple[int, int]:
    """(frames yielded, the most alive at once) for a consumer that drops each frame."""
    import collections

    seen = {}
    collections.deque(_tracked(frames, seen), maxlen=0)  # consumes without keeping a reference
    return seen["count"], seen["most"]


@pytest.mark.parametrize("n_frames", [12, 600])
def test_video_frames_are_decoded_one_at_a_time(tmp_path, n_frames):
    """The reader holds no frame once the consumer drops it: at most one frame is alive at a
    time for a short and a 50x longer video, so memory does not grow with the video's length."""
    path = tmp_path / "clip.mp4"
    _write_video(path, n_frames)
    video = VideoFrames(path)
    assert video.fps == 10.0 and video.frames == n_frames
    assert _most_frames_alive(video) == (n_frames, 1)
    sampled = VideoFrames(path, fps=2.5)  # every 4th frame
    assert sampled.fps == 2.5 and _most_frames_alive(sampled) == (n_frames // 4, 1)


def test_video_frames_errors_name_the_file(tmp_path):
    pytest.importorskip("av", reason="PyAV not installed (pip install mixerzoo[video])")
    with pytest.raises(FileNotFoundError, match="no such video file"):
        VideoFrames(tmp_path / "missing.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"broken.mp4: not a readable video file"):
        VideoFrames(tmp_path / "broken.mp4")


def test_stream_command_holds_at_most_two_frames(tmp_path, monkeypatch, capsys):
    """`mixerzoo stream` prefills each decoded frame and drops it: the one being pushed and the
    previous one (until the loop variable moves on) are the most alive at once, whatever the length."""
    import mixerzoo.vlm
    from mixerzoo.cli import main

    path = tmp_path / "clip.mp4"
    _write_video(path, 40)
    seen = {}

    class Tracked(VideoFrames):
        def __iter__(self):
            return _tracked(super().__iter__(), seen)

    monkeypatch.setattr(mixerzoo.vlm, "VideoFrames", Tracked)
    main(["stream", str(path), "--frame-size", "56", "--fps", "10"])
    assert seen["count"] == 40 and seen["most"] <= 2, seen
    assert "| infinitevl/tiny | 40 | 4 |" in capsys.readouterr().out
