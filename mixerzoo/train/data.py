"""Training data: examples (token ids, aligned labels, processed media), datasets built from the
synthetic tasks or JSONL files, and the collator that pads or packs them into batches.

Labels are aligned with the logits: labels[t] is the target of the logits at position t (for
text that is the next token), IGNORE (-100) where there is nothing to learn.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Protocol, Sequence

import torch

from mixerzoo.errors import describe
from mixerzoo.tasks.loop import IGNORE
from mixerzoo.tasks.mqar import MQARConfig, make_mqar
from mixerzoo.tasks.text import TextWindowsConfig, stdlib_corpus, text_windows
from mixerzoo.tasks.visual import VisualRecallConfig, make_visual_recall, sized_processor
from mixerzoo.train.config import DataConfig
from mixerzoo.vlm.processor import ProcessorConfig, expand_vision_tokens, process_images


@dataclasses.dataclass
class Example:
    """One training sequence: ids [T], labels [T] aligned with logits, and its images' processor
    outputs (pixel_values [N_patches, patch_dim], image_grid_thw [n_images, 3]) when it has any."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def __post_init__(self):
        if self.input_ids.dim() != 1 or self.labels.shape != self.input_ids.shape:
            raise ValueError(f"Example: input_ids and labels must both be [T]; got {list(self.input_ids.shape)} "
                             f"and {list(self.labels.shape)}")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("Example: give pixel_values and image_grid_thw together")

    @property
    def n_targets(self) -> int:
        """Positions with a label."""
        return int((self.labels != IGNORE).sum())


class Dataset(Protocol):
    """Anything indexable that returns Examples: `len(data)`, `data[i]`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (bytes 0xF5-0xFF never occur in UTF-8, so a tiny model's
    vision special tokens at the top of a 256 vocabulary never collide with text)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (invalid bytes replaced)."""
        return bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(name: str):
    """"bytes" for ByteTokenizer, else a Hugging Face tokenizer path (needs transformers)."""
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


class TensorDataset:
    """Examples from rows of ids [N, T] and labels [N, T] (the synthetic text tasks)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        if input_ids.shape != labels.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids and labels must both be [N, T]; got {list(input_ids.shape)}, {list(labels.shape)}")
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> Example:
        return Example(self.input_ids[index], self.labels[index])


class JSONLDataset:
    """Examples from a JSONL file, one object per line:
    {"prompt": "text, <image> where an image goes", "answer": "text", "images": ["a.png", ...]}.
    Image paths are relative to the file and must lie in its folder unless `images_anywhere`. Every
    line and every image is checked when the dataset is made (before any step); an error names the
    file and the line. Loss is on the answer tokens only."""

    IMAGE = "<image>"

    def __init__(self, path: str | Path, tokenizer, processor: ProcessorConfig | None = None, *,
                 images_anywhere: bool = False):
        self.path = Path(path)
        self.tokenizer, self.processor = tokenizer, processor
        self.images_anywhere = images_anywhere
        self.records = []
        with open(self.path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{self.path}:{line_no}: not JSON: {error}") from error
                self._check(record, line_no)
                self.records.append(record)
        if not self.records:
            raise ValueError(f"{self.path}: no examples")

    def _check(self, record, line_no: int) -> None:
        where = f"{self.path}:{line_no}"
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not isinstance(record.get("answer"), str):
            raise ValueError(f"{where}: each line needs string fields 'prompt' and 'answer'")
        extra = set(record) - {"prompt", "answer", "images"}
        if extra:
            raise ValueError(f"{where}: unknown field(s) {sorted(extra)}")
        n_markers, images = record["prompt"].count(self.IMAGE), record.get("images", [])
        if n_markers != len(images):
            raise ValueError(f"{where}: the prompt has {n_markers} {self.IMAGE} marker(s) but {len(images)} image(s)")
        if images and self.processor is None:
            raise ValueError(f"{where}: has images but the model is a text-only Decoder")
        if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
            raise ValueError(f"{where}: 'images' must be a list of file names")
        for name in images:
            self._check_image(name, where)

    def _check_image(self, name: str, where: str) -> None:
        """The image exists, lies in the data folder (unless images_anywhere) and decodes as an image."""
        from PIL import Image, UnidentifiedImageError

        folder = self.path.parent.resolve()
        image = (folder / name).resolve()
        if not self.images_anywhere and not image.is_relative_to(folder):
            raise ValueError(f"{where}: image {name!r} lies outside the data folder {folder} "
                             f"(set images_anywhere: true to allow it)")
        if not image.is_file():
            raise ValueError(f"{where}: image {name!r} not found ({image})")
        try:
            with Image.open(image) as opened:
                opened.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{where}: image {name!r} is not a readable image ({describe(error)})") from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        from PIL import Image

        record = self.records[index]
        pieces = record["prompt"].split(self.IMAGE)
        parts: list = []
        for i, piece in enumerate(pieces):
            if i:
                parts.append("image")
            parts.append(self.tokenizer.encode(piece))
        pixel_values = grid = None
        if record.get("images"):
            images = [Image.open(self.path.parent / name).convert("RGB") for name in record["images"]]
            pixel_values, grid = process_images(images, self.processor)
        prompt = expand_vision_tokens(parts, image_grid_thw=grid, config=self.processor or ProcessorConfig())
        answer = self.tokenizer.encode(record["answer"])
        ids = torch.tensor(prompt + answer, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        labels[len(prompt) - 1:-1] = ids[len(prompt):]  # the logits at t predict token t + 1
        return Example(ids, labels, pixel_values, grid)


def build_dataset(config: DataConfig, *, vocab_size: int, processor: ProcessorConfig | None) -> Dataset:
    """The dataset `config` names, for a model of `vocab_size` (and `processor`, for a VLM)."""
    if config.source == "mqar":
        task = MQARConfig.model_validate({"vocab_size": vocab_size, **config.task})
        return TensorDataset(*make_mqar(task, config.n_examples, config.seed))
    if config.source == "visual-recall":
        if processor is None:
            raise ValueError("data source 'visual-recall' needs a VLM")
        return visual_recall_dataset(config.task, config.n_examples, config.seed, processor, vocab_size=vocab_size)
    if config.source == "stdlib-text":
        task = TextWindowsConfig.model_validate(config.task)
        if vocab_size < 256:
            raise ValueError(f"data source 'stdlib-text' is bytes: the model needs vocab_size >= 256, it has {vocab_size}")
        return TensorDataset(*text_windows(stdlib_corpus(task.split), config.n_examples, task.seq_len, config.seed))
    return JSONLDataset(config.path, load_tokenizer(config.tokenizer), processor, images_anywhere=config.images_anywhere)


def visual_recall_dataset(task: dict, n_examples: int, seed: int, processor: ProcessorConfig, *,
                          vocab_size: int) -> list[Example]:
    """Examples of mixerzoo.tasks.visual's visual-recall task (`task`: VisualRecallConfig fields)."""
    config = VisualRecallConfig.model_validate({"vocab_size": vocab_size, **task})
    batch = make_visual_recall(config, n_examples, seed, sized_processor(processor, config.image_size))
    per_image = batch["image_grid_thw"].prod(-1)  # [B * K] patches of each image
    k = config.n_images
    pixels = batch["pixel_values"].split(per_image.view(n_examples, k).sum(-1).tolist())
    return [Example(batch["input_ids"][b], batch["labels"][b], pixels[b], batch["image_grid_thw"][b * k:(b + 1) * k])
            for b in range(n_examples)]


def collate(examples: Sequence[Example], *, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """A batch: input_ids, labels, valid [B, T] (right-padded to the longest), media concatenated in
    order; with `pack_length`, examples are packed first-fit in order into rows of that length and
    `documents` [B, T] (document index per token, -1 on padding) marks where states reset."""
    if not examples:
        raise ValueError("collate needs at least one example")
    rows: list[list[Example]] = [[e] for e in examples]
    if pack_length is not None:
        rows = []
        for e in examples:
            if len(e.input_ids) > pack_length:
                raise ValueError(f"an example of {len(e.input_ids)} tokens does not fit max_length {pack_length}")
            if rows and sum(len(x.input_ids) for x in rows[-1]) + len(e.input_ids) <= pack_length:
                rows[-1].append(e)
            else:
                rows.append([e])
    length = pack_length or max(sum(len(x.input_ids) for x in row) for row in rows)
    batch = len(rows)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    documents = torch.full((batch, length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, e in enumerate(row):
            end = start + len(e.input_ids)
            input_ids[r, start:end], labels[r, start:end], documents[r, start:end] = e.input_ids, e.labels, d
            start = end
    out = {"input_ids": input_ids, "labels": labels, "valid": documents >= 0}
    if pack_length is not None:
        out["documents"] = documents
    media = [e for row in rows for e in row if e.pixel_values is not None]
    if media:
        out["pixel_values"] = torch.cat([e.pixel_values for e in media])
        out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in media])
    return out
