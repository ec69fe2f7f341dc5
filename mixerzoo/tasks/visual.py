"""Synthetic information-intensive visual tasks for VLMs: image recall and video-stream recall.

Images are digits (or short digit strings), from one of two sources (`digit_source`):
"font", rendered with Pillow's default font on a random dark background, at a random
position, in a random bright colour; or "scans", real handwritten digits (scikit-learn's
bundled `load_digits`: 1,797 8 x 8 scans by 43 writers, no download), a random scan of each
digit upsampled to its share of the image, from a fixed training or held-out split of the
scans (`scan_split`), so evaluation reads handwriting the model never saw. Gaussian pixel
noise on both, so a model must read the digits rather than memorise pixels.

Visual recall (`make_visual_recall`), K images then filler text then K queries::

    idx_0 <vs> pad.. <ve>  idx_1 <vs> pad.. <ve> ...  f f f ... f   Q idx_2 ->  Q idx_0 -> ...
                                                                           d(2)        d(0)     labels

Stream recall (`make_stream_recall`), one video of noise frames with a few key frames
showing digits early, then one question about key frame j::

    <vs> [noise][key 0][key 1][noise] ... [noise] <ve>  Q idx_j ->
                                                              d(j)                       labels

The logits at position t predict labels[t] (no shift, as in MQAR); labels are -100 except
at the answer positions. With digits D > 1 per image, the answer is D tokens, the first
D - 1 of them fed after the arrow (teacher forcing): `Q idx ->  d1 .. d(D-1)` is labelled
`-100 -100 d1 d2 .. dD`.

Token layout (defaults fit the tiny recipes' 256-token vocabulary with the vision ids at
252..255): digit k is `digit_offset + k`, image / key index i is `index_offset + i`, the
query and arrow tokens are single ids, and filler text is drawn from
[filler_low, filler_high). The ranges must be disjoint and avoid the processor's vision ids.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, model_validator
from typing_extensions import Self

from mixerzoo.tasks.loop import IGNORE, Batch
from mixerzoo.vlm.processor import ProcessorConfig, expand_vision_tokens, process_images, process_video
from mixerzoo.errors import StrictModel



SCAN_TEST_FRACTION = 0.2


@functools.cache
def digit_scans(split: str) -> tuple[np.ndarray, ...]:
    """Real handwritten digit scans per digit 0..9 (scikit-learn's bundled `load_digits`): a tuple of ten
    uint8 arrays [n_k, 8, 8] on the 0-255 scale; "train" holds the first 80% of each digit's scans, "test"
    the rest."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("digit_source 'scans' needs scikit-learn (pip install scikit-learn): its load_digits "
                          "ships the scans") from error
    data = load_digits()
    images = np.rint(data.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    per_digit = []
    for digit in range(10):
        scans = images[data.target == digit]
        cut = int(round(len(scans) * (1 - SCAN_TEST_FRACTION)))
        per_digit.append(scans[:cut] if split == "train" else scans[cut:])
    return tuple(per_digit)


class _VisualTaskConfig(StrictModel):
    """What the two visual tasks share: the vocabulary's token layout and how digits are drawn."""

    vocab_size: int = Field(256, gt=0, description="the model's vocabulary; every task token must be below it")
    image_size: int = Field(28, gt=0, description="side of each square image / frame in pixels (a multiple of "
                                                  "patch_size * merge_size: 28 gives 1 visual token)")
    digits: int = Field(1, ge=1, le=4, description="digits per image; the answer is that many tokens")
    font_size: int = Field(28, gt=0, description="size of Pillow's default font (must fit in image_size; glyphs much "
                           "smaller than the image are hard for a tiny vision tower to learn)")
    noise: float = Field(8.0, ge=0, description="std of the Gaussian pixel noise, on the 0-255 scale")
    digit_source: Literal["font", "scans"] = Field("font", description="rendered font glyphs, or real handwritten "
                                                   "scans (scikit-learn's load_digits)")
    scan_split: Literal["train", "test"] = Field("train", description="scans: which fixed split the digits come "
                                                 f"from (the last {SCAN_TEST_FRACTION:.0%} of each digit's scans are test)")
    digit_offset: int = Field(1, ge=0, description="token of digit k is digit_offset + k")
    index_offset: int = Field(16, ge=0, description="token of image / key index i is index_offset + i")
    query_token: int = Field(32, ge=0, description="starts a query")
    arrow_token: int = Field(33, ge=0, description="ends a query's prompt; its label is the first answer digit")
    filler_low: int = Field(64, ge=0, description="filler text tokens are drawn from [filler_low, filler_high)")
    filler_high: int = Field(252, ge=1)

    def _n_indices(self) -> int:
        """Index tokens the task uses (images or key frames); each subclass says."""
        raise NotImplementedError

    def token_ranges(self) -> dict[str, range]:
        """The token ids each role uses, by the config field that places them."""
        return {
            "digit_offset": range(self.digit_offset, self.digit_offset + 10),
            "index_offset": range(self.index_offset, self.index_offset + self._n_indices()),
            "query_token": range(self.query_token, self.query_token + 1),
            "arrow_token": range(self.arrow_token, self.arrow_token + 1),
            "filler_low": range(self.filler_low, self.filler_high),
        }

    @model_validator(mode="after")
    def _tokens_fit(self) -> Self:
        """Filler range non-empty, every role's tokens inside the vocabulary and disjoint from the others'."""
        if self.filler_high <= self.filler_low:
            raise ValueError(f"filler_high ({self.filler_high}) must exceed filler_low ({self.filler_low})")
        ranges = self.token_ranges()
        for name, ids in ranges.items():
            if ids.stop > self.vocab_size:
                raise ValueError(f"{name}: tokens [{ids.start}, {ids.stop}) exceed vocab_size ({self.vocab_size})")
        names = list(ranges)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if max(ranges[a].start, ranges[b].start) < min(ranges[a].stop, ranges[b].stop):
                    raise ValueError(f"{a} tokens [{ranges[a].start}, {ranges[a].stop}) overlap {b} tokens "
                                     f"[{ranges[b].start}, {ranges[b].stop})")
        return self


class VisualRecallConfig(_VisualTaskConfig):
    """Visual recall: `n_images` digit images, `filler` text tokens, then one query per image."""

    n_images: int = Field(4, ge=1, le=16, description="images per example (K), each queried once")
    filler: int = Field(32, ge=0, description="filler text tokens between the last image and the first query")

    def _n_indices(self) -> int:
        return self.n_images


class StreamRecallConfig(_VisualTaskConfig):
    """Stream recall: a video of `lead_frames` noise slots, `n_keys` digit key slots, `gap_frames` noise
    slots, then a question about one key. A slot is temporal_patch_size identical frames (one temporal patch)."""

    n_keys: int = Field(1, ge=1, le=16, description="key frames, shown one after another; the question picks one")
    lead_frames: int = Field(1, ge=0, description="noise slots before the first key frame")
    gap_frames: int = Field(8, ge=0, description="noise slots between the last key frame and the question")
    fps: float = Field(2.0, gt=0, description="frame rate of the video (sets its temporal M-RoPE spacing)")

    def _n_indices(self) -> int:
        return self.n_keys


def sized_processor(config: ProcessorConfig, image_size: int) -> ProcessorConfig:
    """`config` with image and video pixel bounds set to image_size^2, so square images keep their size."""
    if image_size % config.factor:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size * merge_size ({config.factor})")
    pixels = image_size * image_size
    return config.model_copy(update=dict(min_pixels=pixels, max_pixels=pixels, video_min_pixels=pixels,
                                         video_max_pixels=pixels))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by `parts` (e.g. run seed, stream, step); distinct parts give unrelated seeds."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _font(config: _VisualTaskConfig) -> ImageFont.FreeTypeFont | ImageFont.ImageFont | None:
    """Pillow's default font at config.font_size, checked to fit `digits` digits into the image (None for scans)."""
    if config.digit_source == "scans":
        return None
    font = ImageFont.load_default(size=config.font_size)
    left, top, right, bottom = font.getbbox("8" * config.digits)
    if right - left > config.image_size or bottom - top > config.image_size:
        raise ValueError(f"font_size ({config.font_size}): {config.digits} digit(s) take {right - left}x{bottom - top} "
                         f"pixels, more than image_size ({config.image_size})")
    return font


def _noisy(pixels: np.ndarray, config: _VisualTaskConfig, rng: np.random.Generator) -> np.ndarray:
    """Pixels [..., S, S, 3] plus Gaussian noise, as uint8."""
    pixels = pixels.astype(np.float32) + rng.normal(0.0, config.noise, size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_digits(digits: Iterable[int], config: _VisualTaskConfig, rng: np.random.Generator,
                  font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None) -> np.ndarray:
    """An image of the digits: [image_size, image_size, 3] uint8 RGB with Gaussian noise. Font: the string
    at a random position in a random bright colour on a random dark background. Scans: a random scan
    of each digit from the config's split, side by side, each upsampled to image_size / digits wide."""
    if config.digit_source == "scans":
        return _noisy(_scanned(digits, config, rng), config, rng)
    font = _font(config) if font is None else font
    text = "".join(str(int(d)) for d in digits)
    background = tuple(int(c) for c in rng.integers(0, 80, size=3))  # dark
    image = Image.new("RGB", (config.image_size, config.image_size), background)
    left, top, right, bottom = font.getbbox(text)
    x = int(rng.integers(0, config.image_size - (right - left) + 1)) - left
    y = int(rng.integers(0, config.image_size - (bottom - top) + 1)) - top
    colour = tuple(int(c) for c in rng.integers(170, 256, size=3))
    ImageDraw.Draw(image).text((x, y), text, fill=colour, font=font)
    return _noisy(np.asarray(image), config, rng)


def _scanned(digits: Iterable[int], config: _VisualTaskConfig, rng: np.random.Generator) -> np.ndarray:
    """Random scans of the digits side by side: [image_size, image_size, 3] uint8 (grey)."""
    scans = digit_scans(config.scan_split)
    digits = [int(d) for d in digits]
    image = np.zeros((config.image_size, config.image_size), dtype=np.uint8)
    width = config.image_size // len(digits)
    for slot, digit in enumerate(digits):
        scan = scans[digit][rng.integers(len(scans[digit]))]
        tile = Image.fromarray(scan).resize((width, config.image_size), Image.Resampling.BILINEAR)
        image[:, slot * width:(slot + 1) * width] = np.asarray(tile)
    return np.repeat(image[:, :, None], 3, axis=2)


def render_noise(n: int, config: _VisualTaskConfig, rng: np.random.Generator) -> np.ndarray:
    """`n` distractor images without digits (random dark backgrounds plus noise): [n, S, S, 3] uint8, S = image_size."""
    background = rng.integers(0, 80, size=(n, 1, 1, 3))
    return _noisy(np.broadcast_to(background, (n, config.image_size, config.image_size, 3)), config, rng)


def _check_processor(config: _VisualTaskConfig, processor: ProcessorConfig) -> None:
    """The processor's vision ids must be in the vocabulary and outside every task token range."""
    for name in ("vision_start_id", "vision_end_id", "image_pad_id", "video_pad_id"):
        token = getattr(processor, name)
        if token >= config.vocab_size:
            raise ValueError(f"processor_config.{name} ({token}) is outside vocab_size ({config.vocab_size})")
        for field, ids in config.token_ranges().items():
            if token in ids:
                raise ValueError(f"processor_config.{name} ({token}) collides with the task's {field} tokens "
                                 f"[{ids.start}, {ids.stop})")


def _query(config: _VisualTaskConfig, index: int, answer: np.ndarray) -> tuple[list[int], list[int]]:
    """(input ids, labels) of `Q idx -> d1 .. d(D-1)`, labelled `-100 -100 d1 .. dD`."""
    digits = [config.digit_offset + int(d) for d in answer]
    ids = [config.query_token, config.index_offset + index, config.arrow_token] + digits[:-1]
    return ids, [IGNORE, IGNORE] + digits


def make_visual_recall(config: VisualRecallConfig, n_examples: int, seed: int,
                       processor_config: ProcessorConfig = ProcessorConfig()) -> Batch:
    """`n_examples` visual-recall examples as one VLM batch; the same seed gives the same batch.

    Returns input_ids [B, T] long, labels [B, T] long, pixel_values [B * K * patches, patch_dim]
    float32 and image_grid_thw [B * K, 3] long (images in row-major (example, image) order, as
    the VLM consumes them), answers [B, K, D] long (the digits of each image), and distance
    [B, K] long (tokens from image i's last visual token to the arrow of its query).
    """
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    _check_processor(config, processor_config)
    rng = np.random.default_rng(seed)
    font = _font(config)
    K, D = config.n_images, config.digits
    answers = rng.integers(0, 10, size=(n_examples, K, D))
    images = [render_digits(answers[b, i], config, rng, font) for b in range(n_examples) for i in range(K)]
    pixel_values, grid = process_images(images, processor_config)  # [B*K*patches, patch_dim], [B*K, 3]
    rows, labels, distance = [], [], np.zeros((n_examples, K), dtype=np.int64)
    for b in range(n_examples):
        ids, last_visual = [], []
        for i in range(K):
            row = b * K + i
            block = expand_vision_tokens(["image"], image_grid_thw=grid[row:row + 1], config=processor_config)
            ids += [config.index_offset + i] + block
            last_visual.append(len(ids) - 2)  # the last pad token, before vision_end
        ids += rng.integers(config.filler_low, config.filler_high, size=config.filler).tolist()
        row_labels = [IGNORE] * len(ids)
        for i in rng.permutation(K).tolist():
            distance[b, i] = len(ids) + 2 - last_visual[i]  # the arrow is the query's third token
            query_ids, query_labels = _query(config, i, answers[b, i])
            ids += query_ids
            row_labels += query_labels
        rows.append(ids)
        labels.append(row_labels)
    return dict(input_ids=torch.tensor(rows), labels=torch.tensor(labels), pixel_values=pixel_values,
                image_grid_thw=grid, answers=torch.from_numpy(answers), distance=torch.from_numpy(distance))


def make_stream_recall(config: StreamRecallConfig, n_examples: int, seed: int,
                       processor_config: ProcessorConfig = ProcessorConfig()) -> Batch:
    """`n_examples` stream-recall examples (one video each) as one VLM batch; the same seed gives the same batch.

    Returns input_ids [B, T] long, labels [B, T] long, pixel_values_videos [B * patches, patch_dim]
    float32, video_grid_thw [B, 3] long, second_per_grid_ts [B] float64, answers [B, n_keys, D]
    long, key [B] long (the key frame each question asks about) and distance [B] long (tokens
    from that key frame's last visual token to the question's arrow).
    """
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    _check_processor(config, processor_config)
    rng = np.random.default_rng(seed)
    font = _font(config)
    slots = config.lead_frames + config.n_keys + config.gap_frames
    repeat = processor_config.temporal_patch_size  # frames per slot: one temporal patch
    answers = rng.integers(0, 10, size=(n_examples, config.n_keys, config.digits))
    keys = rng.integers(0, config.n_keys, size=n_examples)
    pixels, grids, seconds, rows, labels, distance = [], [], [], [], [], []
    for b in range(n_examples):
        frames = render_noise(slots, config, rng)  # [slots, S, S, 3]
        for k in range(config.n_keys):
            frames[config.lead_frames + k] = render_digits(answers[b, k], config, rng, font)
        video = np.repeat(frames, repeat, axis=0)  # [slots * repeat, S, S, 3]
        pv, grid, second_per_grid = process_video(video, processor_config, fps=config.fps)
        ids = expand_vision_tokens(["video"], video_grid_thw=grid, config=processor_config)
        per_slot = (len(ids) - 2) // slots  # visual tokens per temporal patch
        key = int(keys[b])
        last_visual = 1 + (config.lead_frames + key + 1) * per_slot - 1  # after vision_start
        query_ids, query_labels = _query(config, key, answers[b, key])
        distance.append(len(ids) + 2 - last_visual)
        labels.append([IGNORE] * len(ids) + query_labels)
        rows.append(ids + query_ids)
        pixels.append(pv)
        grids.append(grid)
        seconds.append(second_per_grid)
    return dict(input_ids=torch.tensor(rows), labels=torch.tensor(labels), pixel_values_videos=torch.cat(pixels),
                video_grid_thw=torch.cat(grids), second_per_grid_ts=torch.tensor(seconds, dtype=torch.float64),
                answers=torch.from_numpy(answers), key=torch.from_numpy(keys), distance=torch.tensor(distance))


__all__ = ["StreamRecallConfig", "VisualRecallConfig", "derive_seed", "make_stream_recall", "make_visual_recall",
           "render_digits", "render_noise", "sized_processor"]
