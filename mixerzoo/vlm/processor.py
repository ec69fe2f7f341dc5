"""Images and videos to Qwen2.5-VL vision patches, and prompts to token ids with vision pads.

Matches Hugging Face's Qwen2.5-VL image processor (its PIL backend) bit for bit: bicubic
resize of uint8 pixels to a `smart_resize` size, rescale by 1/255, CLIP normalisation,
and the patch order the vision tower expects. Needs numpy and Pillow; PyAV for `VideoFrames` and `read_video`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np
import torch
from pydantic import Field, model_validator
from typing_extensions import Self

from mixerzoo.errors import StrictModel

try:
    from PIL import Image
except ImportError:  # Pillow is needed only by the functions that resize pixels
    Image = None

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union["Image.Image", np.ndarray]


class ProcessorConfig(StrictModel):
    """Qwen2.5-VL's preprocessing constants and special token ids (the transformers defaults)."""

    patch_size: int = Field(14, gt=0, description="side of a square ViT patch, in pixels")
    temporal_patch_size: int = Field(2, gt=0, description="frames per patch (an image is repeated to fill it)")
    merge_size: int = Field(2, gt=0, description="side of the square of patches merged into one LLM token")
    min_pixels: int = Field(56 * 56, gt=0, description="fewest pixels an image is resized to")
    max_pixels: int = Field(
        28 * 28 * 1280,
        gt=0,
        description="most pixels an image is resized to (the transformers default; the released "
        "Qwen2.5-VL checkpoints' preprocessor_config.json sets 12845056)",
    )
    image_mean: tuple[float, float, float] = Field(OPENAI_CLIP_MEAN, description="per-channel mean, RGB")
    image_std: tuple[float, float, float] = Field(OPENAI_CLIP_STD, description="per-channel std, RGB")
    video_min_pixels: int = Field(128 * 28 * 28, gt=0, description="fewest pixels a video frame is resized to")
    video_max_pixels: int = Field(768 * 28 * 28, gt=0, description="most pixels a video frame is resized to")
    video_fps: float = Field(2.0, gt=0, description="frame rate assumed for frames given without one")
    vision_start_id: int = Field(151652, ge=0, description="<|vision_start|>")
    vision_end_id: int = Field(151653, ge=0, description="<|vision_end|>")
    image_pad_id: int = Field(151655, ge=0, description="<|image_pad|>, one per merged image token")
    video_pad_id: int = Field(151656, ge=0, description="<|video_pad|>, one per merged video token")
    tokens_per_second: int = Field(2, gt=0, description="temporal M-RoPE positions per second of video")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for lo, hi in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo}={getattr(self, lo)} exceeds {hi}={getattr(self, hi)}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        ids = [self.vision_start_id, self.vision_end_id, self.image_pad_id, self.video_pad_id]
        if len(set(ids)) != 4:
            raise ValueError(f"vision_start/vision_end/image_pad/video_pad ids must differ, got {ids}")
        return self

    @property
    def factor(self) -> int:
        """Pixels per merged token side: resized images are multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: 3 channels x temporal_patch_size x patch_size^2."""
        return 3 * self.temporal_patch_size * self.patch_size**2


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen's target (height, width): multiples of `factor`, pixel count within the bounds, aspect kept.

    Each side is rounded to the nearest multiple of `factor`; if that overshoots
    `max_pixels` (undershoots `min_pixels`) both sides are scaled down (up) by one factor
    and floored (ceiled) to multiples of `factor`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got height={height}, width={width}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} exceeds max_pixels={max_pixels}")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is below one {factor}x{factor} tile")
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {ratio:.1f} for {height}x{width}")
    h_bar = round(height / factor) * factor  # Python's round: halves go to the even multiple, as Qwen's
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _require_pillow(what: str) -> None:
    if Image is None:
        raise ImportError(f"{what} needs Pillow: pip install pillow")


def _to_pil_rgb(image: ImageLike, what: str) -> "Image.Image":
    """A PIL RGB image from a PIL image (transparency composited on white) or an HxWx3 uint8 array."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"{what}: arrays must be HxWx3 uint8 (RGB), got shape {list(image.shape)} dtype {image.dtype}"
            )
        return Image.fromarray(np.ascontiguousarray(image))  # HxWx3 uint8 is RGB
    raise TypeError(f"{what}: expected a PIL image or an HxWx3 uint8 numpy array, got {type(image).__name__}")


def _normalized_chw(image: "Image.Image", height: int, width: int, config: ProcessorConfig) -> np.ndarray:
    """Resize (bicubic, on uint8) and normalise: [3, height, width] float32."""
    resized = np.asarray(image.resize((width, height), resample=Image.BICUBIC))  # [H, W, 3] uint8
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)  # rounded once to float32, as Qwen
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return ((scaled - mean) / std).transpose(2, 0, 1)  # [3, H, W]


def _patchify(frames_TCHW: np.ndarray, config: ProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Frames [T, 3, H, W] (T a multiple of temporal_patch_size) to patches [t*h*w, patch_dim] and (t, h, w).

    Row order: (t, h / merge, w / merge, merge, merge); values within a row: (channel, frame, y, x).
    """
    T, C, H, W = frames_TCHW.shape
    tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    grid_t, grid_h, grid_w = T // tp, H // p, W // p
    x = frames_TCHW.reshape(grid_t, tp, C, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, tp, p, p]
    return x.reshape(grid_t * grid_h * grid_w, C * tp * p * p), (grid_t, grid_h, grid_w)


def process_images(
    images: ImageLike | Sequence[ImageLike], config: ProcessorConfig = ProcessorConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images to (pixel_values [N_patches, patch_dim] float32, image_grid_thw [n_images, 3] int64).

    `images` is one image or a sequence of them, each a PIL image or an HxWx3 uint8 RGB
    array (a 4-D [N, H, W, 3] array is N images). Each is resized to its own
    `smart_resize` size; patches of all images are concatenated in order.
    """
    _require_pillow("process_images")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, np.ndarray) or (Image is not None and isinstance(images, Image.Image)):
        images = [images]
    if len(images) == 0:
        raise ValueError("process_images needs at least one image")
    patches, grids = [], []
    for i, image in enumerate(images):
        pil = _to_pil_rgb(image, f"image {i}")
        height, width = smart_resize(
            pil.height, pil.width, config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
        chw = _normalized_chw(pil, height, width, config)
        frames = np.broadcast_to(chw[None], (config.temporal_patch_size, *chw.shape))  # one frame, repeated
        rows, grid = _patchify(frames, config)
        patches.append(rows)
        grids.append(grid)
    pixel_values = torch.from_numpy(np.concatenate(patches, axis=0))  # [N_patches, patch_dim]
    return pixel_values, torch.tensor(grids, dtype=torch.long)  # [n_images, 3]


def process_video(
    frames: np.ndarray | Sequence["Image.Image"], config: ProcessorConfig = ProcessorConfig(), fps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One video to (pixel_values_videos [N, patch_dim] float32, video_grid_thw [1, 3] int64, second_per_grid_t).

    `frames` is a [T, H, W, 3] uint8 RGB array or a list of same-sized PIL images, at
    `fps` frames per second (default `config.video_fps`). Every frame is resized to one
    `smart_resize` size within the video pixel bounds; T is padded to a multiple of
    temporal_patch_size by repeating the last frame. Consecutive frames share a patch;
    second_per_grid_t (seconds per temporal patch) = temporal_patch_size / fps.
    """
    _require_pillow("process_video")
    fps = config.video_fps if fps is None else float(fps)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(f"video frames must be a [T, H, W, 3] uint8 array, got shape {list(frames.shape)}")
    if len(frames) == 0:
        raise ValueError("process_video needs at least one frame")
    pils = [_to_pil_rgb(frame, f"frame {i}") for i, frame in enumerate(frames)]
    sizes = {pil.size for pil in pils}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must have one size, got (width, height) sizes {sorted(sizes)}")
    height, width = smart_resize(
        pils[0].height,
        pils[0].width,
        config.factor,
        min_pixels=config.video_min_pixels,
        max_pixels=config.video_max_pixels,
    )
    video = np.stack([_normalized_chw(pil, height, width, config) for pil in pils])  # [T, 3, H, W]
    pad = -len(pils) % config.temporal_patch_size  # repeat the last (already resized) frame
    video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    rows, grid = _patchify(video, config)
    second_per_grid_t = config.temporal_patch_size / fps
    return torch.from_numpy(rows), torch.tensor([grid], dtype=torch.long), second_per_grid_t


class VideoFrames:
    """A video file's frames (first video stream), decoded one at a time while iterating:
    [H, W, 3] uint8 RGB arrays, never more than one held by the reader, so memory does not
    grow with the video's length.

    With `fps` None every frame is kept and `fps` is the stream's average rate. With `fps`
    set, frame i is kept when floor(i * fps / native_fps) moves on (the first frame always):
    about `fps` frames per second, evenly spaced, never more than the video has; the
    attribute `fps` is then min(fps, native_fps), the rate of the kept frames. `frames` is
    the number of kept frames when the container reports a frame count, else None.
    """

    def __init__(self, path: str | os.PathLike, fps: float | None = None):
        try:
            import av
        except ImportError as err:
            raise ImportError("reading video files needs PyAV: pip install mixerzoo[video] (or pip install av)") from err
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(2, "no such video file", str(path))
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise ValueError(f"{path}: no video stream")
                stream = container.streams.video[0]
                rate, count = stream.average_rate or stream.guessed_rate, stream.frames
        except av.error.FFmpegError as error:
            raise ValueError(f"{path}: not a readable video file ({error})") from None
        if not rate:
            raise ValueError(f"{path}: the video stream reports no frame rate")
        self.native_fps = float(rate)
        self._keep = None if fps is None or fps >= self.native_fps else Fraction(fps) / Fraction(rate)
        self.fps = self.native_fps if self._keep is None else float(fps)
        self.frames = (count if self._keep is None else math.ceil(count * self._keep)) if count else None

    def __iter__(self) -> Iterator[np.ndarray]:
        import av

        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if self._keep is None or i == 0 or math.floor(i * self._keep) != math.floor((i - 1) * self._keep):
                    yield frame.to_ndarray(format="rgb24")


def read_video(path: str | os.PathLike, fps: float | None = None) -> tuple[np.ndarray, float]:
    """Decode a video file's frames (kept as `VideoFrames` keeps them) to (frames [T, H, W, 3]
    uint8 RGB, fps of those frames): pass the fps on to `process_video`. All kept frames are
    held in memory; iterate `VideoFrames(path, fps)` to stream a long video instead."""
    video = VideoFrames(path, fps)
    frames = list(video)
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(frames), video.fps


def expand_vision_tokens(
    parts: Sequence[Sequence[int] | str],
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    config: ProcessorConfig = ProcessorConfig(),
) -> list[int]:
    """Token ids of a prompt whose parts are text ids, "image" or "video".

    Each "image" / "video" becomes vision_start, t*h*w / merge_size^2 pad tokens (from
    the next row of its grid, in order), vision_end. Every grid row must be used.
    """
    grids = {
        "image": grid_rows(image_grid_thw, "image_grid_thw"),
        "video": grid_rows(video_grid_thw, "video_grid_thw"),
    }
    wanted = {kind: sum(1 for part in parts if isinstance(part, str) and part == kind) for kind in grids}
    for kind, rows in grids.items():
        if wanted[kind] != len(rows):
            raise ValueError(
                f"the prompt has {wanted[kind]} {kind} part(s) but {kind}_grid_thw has {len(rows)} row(s)"
            )
    pad = {"image": config.image_pad_id, "video": config.video_pad_id}
    used = {"image": 0, "video": 0}
    ids: list[int] = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            if part not in grids:
                raise ValueError(f"part {i}: a string part must be 'image' or 'video', got {part!r}")
            t, h, w = grids[part][used[part]]
            if h % config.merge_size or w % config.merge_size:
                raise ValueError(
                    f"part {i}: {part} grid {[t, h, w]} has h or w not divisible by merge_size={config.merge_size}"
                )
            used[part] += 1
            ids += [config.vision_start_id] + [pad[part]] * (t * h * w // config.merge_size**2) + [config.vision_end_id]
        elif isinstance(part, (Sequence, torch.Tensor, np.ndarray)):
            text = [int(x) for x in (part.tolist() if hasattr(part, "tolist") else part)]
            if pad["image"] in text or pad["video"] in text:
                raise ValueError(f"part {i}: text holds an image or video pad id; write 'image' / 'video' parts instead")
            ids += text
        else:
            raise TypeError(f"part {i}: expected a list of token ids, 'image' or 'video', got {type(part).__name__}")
    return ids


def grid_rows(grid: torch.Tensor | Sequence[Sequence[int]] | None, name: str) -> list[tuple[int, int, int]]:
    """Grid rows as int triples (t, h, w), each positive; none for None. A grid is host metadata: a
    list of triples is used as is, a tensor is read once."""
    if grid is None:
        return []
    if isinstance(grid, (torch.Tensor, np.ndarray)):
        if len(grid.reshape(-1)) == 0:
            return []
        if grid.ndim != 2 or grid.shape[1] != 3:
            raise ValueError(f"{name} must be [n, 3] (t, h, w), got shape {list(grid.shape)}")
        grid = grid.tolist()
    if any(not isinstance(row, (Sequence, np.ndarray, torch.Tensor)) or len(row) != 3 for row in grid):
        raise ValueError(f"{name} must be [n, 3] (t, h, w), got {grid}")
    rows = [tuple(int(v) for v in row) for row in grid]
    for row in rows:
        if min(row) <= 0:
            raise ValueError(f"{name} rows must be 3 positive ints (t, h, w), got {list(row)}")
    return rows
