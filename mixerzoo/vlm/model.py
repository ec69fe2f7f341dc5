"""The vision-language model: a Qwen2.5-VL vision tower feeding any Decoder layout, with M-RoPE.

`logits, state = vlm(input_ids, pixel_values=..., image_grid_thw=..., state=state)`: the
vision features replace the image / video pad tokens, M-RoPE positions continue from the
state, and the decoder runs the usual recurrent-state protocol, so prefill, decode and
streaming video are the same call.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from pydantic import model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.blocks import Decoder, DecoderState, LayoutSpec, continue_stream
from mixerzoo.blocks.decoder import check_token_ids
from mixerzoo.errors import StrictModel, finite_tensors, open_safetensors
from mixerzoo.mixers.base import atomic_save_safetensors, device_check
from mixerzoo.mixers.packing import PackedLayout
from mixerzoo.vlm.positions import MRopeState, mrope_positions
from mixerzoo.vlm.processor import ProcessorConfig
from mixerzoo.vlm.vision import VisionConfig, VisionTower

_STATE_FORMAT = "mixerzoo.vlm_state/1"


class VLMSpec(StrictModel):
    """A VLM: the decoder layout, the vision tower, and the token / position conventions."""

    decoder: LayoutSpec
    vision: VisionConfig
    processor: ProcessorConfig = ProcessorConfig()

    @model_validator(mode="after")
    def _parts_fit(self) -> Self:
        if self.vision.out_hidden_size != self.decoder.d_model:
            raise ValueError(f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal "
                             f"decoder.d_model ({self.decoder.d_model})")
        for i, layer in enumerate(self.decoder.layers):
            for mixer in layer.mixer.branches():
                rope = getattr(mixer, "rope", None)
                if rope is not None and rope.kind == "rope":
                    raise ValueError(f"decoder layer {i} ({mixer.type}): a VLM needs rope kind 'mrope' (or 'none') "
                                     f"on its rotary layers, got 'rope'")
        vocab = self.decoder.vocab_size
        p = self.processor
        for name in ("vision_start_id", "vision_end_id", "image_pad_id", "video_pad_id"):
            if not 0 <= getattr(p, name) < vocab:
                raise ValueError(f"processor.{name} ({getattr(p, name)}) is outside the vocabulary (size {vocab})")
        return self


@dataclasses.dataclass
class VLMState:
    """The decoder's state plus the M-RoPE position state, per row."""

    decoder: DecoderState
    rope: MRopeState

    @property
    def batch_size(self) -> int:
        """Number of rows (independent streams)."""
        return self.decoder.batch_size

    @property
    def seen(self) -> torch.Tensor:
        """[B] valid tokens each row has seen."""
        return self.decoder.seen

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the state holds."""
        return self.decoder.nbytes + sum(t.numel() * t.element_size() for t in self.rope.tensors().values())

    def clone(self) -> Self:
        """An independent fork."""
        return VLMState(self.decoder.clone(), self.rope.clone())

    def select(self, rows: Sequence[int] | torch.Tensor) -> Self:
        """The sub-batch of `rows`."""
        return VLMState(self.decoder.select(rows), self.rope.select(rows))

    def canonical(self) -> Self:
        """The decoder state in its canonical layout (see MixerState.canonical)."""
        return VLMState(self.decoder.canonical(), self.rope)

    def with_capacity(self, capacity: int) -> Self:
        """Full-attention caches preallocated for `capacity` tokens per row (see DecoderState.with_capacity)."""
        return VLMState(self.decoder.with_capacity(capacity), self.rope)

    @classmethod
    def concat(cls, states: Sequence[Self]) -> Self:
        """One batch holding the rows of `states` in order."""
        return VLMState(DecoderState.concat([s.decoder for s in states]), MRopeState.concat([s.rope for s in states]))

    def save(self, path: str | os.PathLike, spec: VLMSpec) -> None:
        """One safetensors file (decoder state, positions, and the spec), written atomically."""
        tensors = self.decoder.flat_tensors()
        tensors.update({f"rope.{name}": t for name, t in self.rope.tensors().items()})
        metadata = {"format": _STATE_FORMAT, "spec": spec.model_dump_json()}
        atomic_save_safetensors({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, Path(path), metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: "VLM", *, device: torch.device | str = "cpu") -> Self:
        """Read a state written by `save`; refuses a file saved for another spec."""
        with open_safetensors(path, device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _STATE_FORMAT:
                raise ValueError(f"{path}: not a mixerzoo VLM state (format {metadata.get('format')!r})")
            saved = VLMSpec.model_validate_json(metadata["spec"])
            if _identity(saved) != _identity(model.spec):
                raise ValueError(f"{path}: state was saved for another VLM spec")
            tensors = finite_tensors(f, path)
        rope = MRopeState.from_tensors({k[len("rope."):]: t for k, t in tensors.items() if k.startswith("rope.")})
        decoder = DecoderState.from_flat_tensors({k: t for k, t in tensors.items() if not k.startswith("rope.")}, model.decoder)
        return cls(decoder, rope)


def _identity(spec: VLMSpec) -> str:
    """The spec without op backends (they never change parameters or state layout)."""
    data = json.loads(spec.model_dump_json())
    for layer in data["decoder"]["layers"]:
        layer["mixer"].pop("backend", None)
    data["vision"].pop("backend", None)
    return json.dumps(data, sort_keys=True)


class VLM(nn.Module):
    """Vision tower + patch merger + Decoder: `logits, state = vlm(input_ids, ..., state=state)`."""

    def __init__(self, spec: VLMSpec):
        super().__init__()
        self.spec = spec
        self.visual = VisionTower(spec.vision)
        self.decoder = Decoder(spec.decoder)

    def init_state(self, batch_size: int, *, device=None, dtype=None, capacity: int | None = None) -> VLMState:
        """The state before any token (full-attention caches preallocated for `capacity` tokens if given)."""
        decoder = self.decoder.init_state(batch_size, device=device, dtype=dtype, capacity=capacity)
        return VLMState(decoder, MRopeState.init(batch_size, device=decoder.seen.device))

    def load_state(self, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> VLMState:
        """A state saved with `state.save(path, vlm.spec)`."""
        return VLMState.load(path, self, device=device)

    def embed(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, d_model] with image / video pad tokens replaced by vision features."""
        embeds = self.decoder.embed(input_ids)
        p = self.spec.processor
        for kind, pad_id, pixels, grid in (
            ("image", p.image_pad_id, pixel_values, image_grid_thw),
            ("video", p.video_pad_id, pixel_values_videos, video_grid_thw),
        ):
            slots = input_ids == pad_id if valid is None else (input_ids == pad_id) & valid
            if pixels is None:  # checked on the device: a decode step never waits for it
                device_check(~slots.any(), f"VLM: {kind} pad tokens but no {kind} pixels were given")
                continue
            features = self.visual(pixels.to(embeds.dtype), grid)  # [N_tokens, d_model]
            device_check(slots.sum() == features.shape[0],
                         f"VLM: the {kind} pad tokens are not as many as the {features.shape[0]} features its pixels give")
            embeds = embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        state: VLMState | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
        valid: torch.Tensor | None = None,
        chunk_size: int | None = None,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, VLMState | None]:
        """input_ids [B, T] (+ media) after `state` -> (logits [B, T, vocab], state).

        Media whose pad tokens are in input_ids come with this call; the decoder may then run
        in chunks of `chunk_size` tokens (vision features and positions are computed once).
        documents [B, T] packs several documents per row for training (see Decoder.forward):
        each document gets the M-RoPE positions and mixing it would get alone; no state.
        """
        check_token_ids(input_ids, self.spec.decoder.vocab_size, "VLM")
        if documents is not None:
            if state is not None or chunk_size is not None:
                raise ValueError("VLM: packed documents start from a fresh state and run in one call "
                                 "(no `state` or `chunk_size` with `documents`)")
            packing = PackedLayout.from_documents(documents)
            if valid is not None and not torch.equal(valid, packing.tokens):
                raise ValueError("VLM: valid must equal documents >= 0 when documents are given")
            valid = packing.tokens
        embeds = self.embed(
            input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, valid=valid,
        )
        if documents is not None:
            alone, _ = mrope_positions(  # [3, N, L]: each document as its own row; media stay in order
                packing.unpack(input_ids), image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts, valid=packing.valid,
                state=MRopeState.init(packing.n_segments, device=input_ids.device), config=self.spec.processor,
            )
            logits, _ = self.decoder(embeds=embeds, positions=packing.pack(alone, lead=1), documents=documents)
            return logits, None
        batch, length = input_ids.shape
        if state is None:
            state = self.init_state(batch, device=input_ids.device, dtype=self.decoder.embed.weight.dtype)
        positions, rope = mrope_positions(
            input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, valid=valid, state=state.rope, config=self.spec.processor,
        )
        step = chunk_size or length
        decoder_state, logits = state.decoder, []
        for start in range(0, length, step):
            end = start + step
            chunk_logits, decoder_state = self.decoder(
                embeds=embeds[:, start:end], state=decoder_state,
                positions=positions[:, :, start:end], valid=None if valid is None else valid[:, start:end],
            )
            logits.append(chunk_logits)
        return torch.cat(logits, dim=1), VLMState(decoder_state, rope)


def save_vlm(model: VLM, path: str | os.PathLike) -> None:
    """Weights and spec in one safetensors file, written atomically (tied weights stored once)."""
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    atomic_save_safetensors(tensors, Path(path), {"format": "mixerzoo.vlm/1", "spec": model.spec.model_dump_json()})


def load_vlm(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> VLM:
    """A VLM saved with `save_vlm`."""
    with open_safetensors(path, device=str(device)) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != "mixerzoo.vlm/1":
            raise ValueError(f"{path}: not a mixerzoo VLM file (format {metadata.get('format')!r})")
        spec = VLMSpec.model_validate_json(metadata["spec"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        model = VLM(spec)
    model.load_state_dict({k: t if dtype is None else t.to(dtype) for k, t in tensors.items()}, strict=True, assign=True)
    return model.eval()


@torch.inference_mode()
def generate_vlm(model: VLM, input_ids: torch.Tensor, *, max_new_tokens: int, state: VLMState | None = None,
                 valid: torch.Tensor | None = None, chunk_size: int | None = None, **media_and_sampling) -> torch.Tensor:
    """Tokens [B, steps] after prompts with media (STOPPED after a row's stop token).

    media_and_sampling: the VLM's media keywords (pixel_values, image_grid_thw, ...) and
    `continue_stream`'s sampling keywords (stop_tokens, temperature, top_k, top_p, generator).
    """
    media_keys = {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    media = {k: v for k, v in media_and_sampling.items() if k in media_keys}
    sampling = {k: v for k, v in media_and_sampling.items() if k not in media_keys}
    logits, state = model(input_ids, state, valid=valid, chunk_size=chunk_size, **media)
    if valid is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    last = valid.shape[1] - 1 - valid.flip(1).to(torch.int8).argmax(1)  # each row's last valid token
    first = logits[torch.arange(input_ids.shape[0]), last].float()
    tokens = list(continue_stream(model, first, state, max_new_tokens=max_new_tokens, **sampling))
    return torch.stack(tokens, dim=1) if tokens else input_ids.new_empty(input_ids.shape[0], 0)
