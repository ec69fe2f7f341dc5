"""The pre-norm residual Block and the Decoder LM built from a LayoutSpec, with its state."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import Self

from mixerzoo.blocks.mlp import Experts, SwiGLU, channel_mixer
from mixerzoo.blocks.spec import LayerSpec, LayoutSpec
from mixerzoo.errors import finite_tensors, open_safetensors
from mixerzoo.mixers import Mixer, MixerState, CompositeState, build_mixer
from mixerzoo.mixers.base import (
    activation_dtype, atomic_save_safetensors, check_count, check_input_dtype, device_check, fused_linear,
)
from mixerzoo.mixers.packing import PackedLayout
from mixerzoo.ops import shared_rotary

_STATE_FORMAT = "mixerzoo.decoder_state/1"


def _residual_sum(residual: torch.Tensor, output: torch.Tensor, scales: tuple[float, float]) -> torch.Tensor:
    alpha, beta = scales
    return residual + output if scales == (1.0, 1.0) else residual * alpha + output * beta


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) when there is an MLP (the spec may
    scale both terms, and add each output to its normed input instead: MiniMax-01's layer)."""

    def __init__(self, spec: LayerSpec, norm_eps: float):
        super().__init__()
        self.from_normed, self.mixer_scales, self.mlp_scales = spec.residual == "normed", spec.mixer_scales, spec.mlp_scales
        d_model = spec.mixer.d_model
        self.mixer_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer: Mixer = build_mixer(spec.mixer)
        mlp = channel_mixer(d_model, spec.mlp)
        if mlp is not None:
            self.mlp_norm = nn.RMSNorm(d_model, eps=norm_eps)
            self.mlp = mlp

    def forward(self, x, state, *, positions=None, valid=None, documents: torch.Tensor | PackedLayout | None = None):
        """x [B, T, d_model] after `state` -> (x, new state); with `documents` (ids [B, T] or their
        PackedLayout, see Mixer.forward_packed), the documents of packed rows are mixed each alone
        from a fresh state, `state` must be None and the returned state is None."""
        if documents is not None and (state is not None or valid is not None):
            raise ValueError("Block: packed documents start from a fresh state and mark their own padding; "
                             "do not pass `state` or `valid` with `documents`")
        normed = self.mixer_norm(x)
        if documents is not None:
            mixed, state = self.mixer.forward_packed(normed, documents, positions=positions), None
        else:
            mixed, state = self.mixer(normed, state, positions=positions, valid=valid)
        x = _residual_sum(normed if self.from_normed else x, mixed, self.mixer_scales)
        if hasattr(self, "mlp"):
            normed = self.mlp_norm(x)
            x = _residual_sum(normed if self.from_normed else x, self.mlp(normed), self.mlp_scales)
        return x, state


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times a constant (Gemma's sqrt(d_model) normaliser); `weight` as nn.Embedding's."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float):
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, embedding_dim]."""
        return super().forward(input_ids) * self.scale


@dataclasses.dataclass
class DecoderState:
    """The model-level state: each layer's mixer state plus the valid tokens seen per row."""

    layers: list[MixerState]
    seen: torch.Tensor  # [B] int64

    @property
    def batch_size(self) -> int:
        """Number of rows (independent streams)."""
        return self.seen.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's state and the position counter."""
        return sum(s.nbytes for s in self.layers) + self.seen.numel() * self.seen.element_size()

    def clone(self) -> Self:
        """An independent fork."""
        return DecoderState([s.clone() for s in self.layers], self.seen.clone())

    def with_capacity(self, capacity: int) -> Self:
        """Every layer state that grows with the tokens (a full-attention KVCache) preallocated for
        `capacity` tokens per row, so every shape of a step is fixed: what GraphDecoder and compiled
        steps need. A StaticKVCache is written in place by each step; `clone()` to keep a fork."""
        check_count("capacity", capacity, minimum=1, owner="DecoderState.with_capacity")
        return DecoderState([s.with_capacity(capacity) for s in self.layers], self.seen)

    def canonical(self) -> Self:
        """Every layer state in its canonical layout (see MixerState.canonical)."""
        return DecoderState([s.canonical() for s in self.layers], self.seen)

    def to(self, device=None, dtype=None) -> Self:
        """Moved to `device`, activation tensors in `dtype` (recurrent states stay float32)."""
        return DecoderState([s.to(device=device, dtype=dtype) for s in self.layers], self.seen.to(device=device))

    def select(self, rows: Sequence[int] | torch.Tensor) -> Self:
        """The sub-batch of `rows`."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.seen.device).reshape(-1)
        return DecoderState([s.select(index) for s in self.layers], self.seen.index_select(0, index))

    @classmethod
    def concat(cls, states: Sequence[Self]) -> Self:
        """One batch holding the rows of `states` in order."""
        if not states:
            raise ValueError("concat needs at least one state")
        if len({len(s.layers) for s in states}) != 1:
            raise ValueError("cannot concat states of models with different layer counts")
        layers = [type(group[0]).concat(list(group)) for group in zip(*(s.layers for s in states))]
        return DecoderState(layers, torch.cat([s.seen for s in states]))

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by a flat name: "seen" and "layers.{i}.{field}"."""
        tensors = {"seen": self.seen}
        for i, layer in enumerate(self.layers):
            tensors.update({f"layers.{i}.{name}": t for name, t in layer.tensors().items()})
        return tensors

    @classmethod
    def from_flat_tensors(cls, tensors: dict[str, torch.Tensor], model: "Decoder") -> Self:
        """The state of `model` from `flat_tensors` output (each layer's state class from its mixer)."""
        layers = []
        for i, block in enumerate(model.layers):
            prefix = f"layers.{i}."
            layers.append(block.mixer.state_from_tensors({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}))
        return cls(layers, tensors["seen"])

    def save(self, path: str | os.PathLike, spec: LayoutSpec) -> None:
        """One safetensors file with the spec embedded, written atomically."""
        tensors = self.flat_tensors()
        metadata = {
            "format": _STATE_FORMAT,
            "spec": spec.to_json(),
            "layer_states": json.dumps([type(s).__name__ for s in self.layers]),
        }
        atomic_save_safetensors({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, Path(path), metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: "Decoder", *, device: torch.device | str = "cpu") -> Self:
        """Read a state written by `save`; refuses a file saved for another spec."""
        with open_safetensors(path, device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _STATE_FORMAT:
                raise ValueError(f"{path}: not a mixerzoo decoder state (format {metadata.get('format')!r})")
            saved = LayoutSpec.from_json(metadata["spec"])
            if _without_backends(saved) != _without_backends(model.spec):
                raise ValueError(f"{path}: state was saved for another spec; saved:\n{saved.to_yaml()}")
            tensors = finite_tensors(f, path)
        return cls.from_flat_tensors(tensors, model)


def _without_backends(spec: LayoutSpec) -> list[dict]:
    return [{**layer.model_dump(mode="json"), "mixer": layer.mixer.identity()} for layer in spec.layers] + [
        spec.model_dump(mode="json", exclude={"layers"})
    ]


def _sharing_rotary():
    """shared_rotary() eagerly; a compiled forward leaves common subexpressions to the compiler."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else shared_rotary()


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, owner: str) -> None:
    """Raise ValueError naming `owner` unless input_ids is an integer [B, T] tensor of ids in [0, vocab_size).

    The range is checked on the device (`torch._assert_async`), so a step never waits for it: a CPU
    raises the ValueError at once; CUDA stops at the next sync with the message (an out-of-range id
    would otherwise be garbage there). A compiled step skips it: its caller checked the ids it feeds.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"{owner}: input_ids must be [B, T], got shape {list(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"{owner}: input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
    if not input_ids.numel() or torch.compiler.is_compiling():
        return
    try:
        device_check(((input_ids >= 0) & (input_ids < vocab_size)).all(), f"{owner}: token ids must be in [0, {vocab_size})")
    except ValueError as error:  # raised here on the CPU only: name the ids
        raise ValueError(f"{error}, got {int(input_ids.min())}..{int(input_ids.max())}") from None


class Decoder(nn.Module):
    """A decoder LM built from a LayoutSpec: `logits, state = model(input_ids, state)`.

    The same call prefills (any chunk length), decodes (T = 1) and streams; `valid`
    [B, T] marks real tokens, pads are no-ops. positions default to the valid tokens
    seen per row and are passed to every mixer. A model with M-RoPE layers takes [S, B, T]
    positions (S sections); [B, T] ones (or the default) are text positions, the same in
    every section, as Qwen2.5-VL gives text.
    """

    def __init__(self, spec: LayoutSpec):
        super().__init__()
        self.spec = spec
        self.embed = (nn.Embedding(spec.vocab_size, spec.d_model) if spec.embed_scale == 1
                      else ScaledEmbedding(spec.vocab_size, spec.d_model, spec.embed_scale))
        self.layers = nn.ModuleList(Block(layer, spec.norm_eps) for layer in spec.layers)
        self.norm = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        sections = [len(getattr(getattr(mixer, "rope", None), "sections", None) or ())
                    for layer in spec.layers for mixer in layer.mixer.branches()]
        self.rope_streams = max(sections, default=0)  # S of M-RoPE positions [S, B, T]; 0 without M-RoPE
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one initialisation, scaled by shapes so it trains at every width and depth: every Linear
        keeps PyTorch's fan-in default (U(+-1/sqrt(fan_in)): std 0.072 at width 64, 0.013 at 2048, where
        GPT-2 / Qwen's constant 0.02 was tuned); the projections that write into the residual stream
        (each mixer's `residual_projection`, each MLP's down_proj) are further divided by sqrt(R), R the
        number of residual branches, so the stream's scale does not grow with depth; token embeddings
        are N(0, 1), unit-RMS codes that the sublayers do not swamp and Adam does not scramble, or, when
        the head is tied to them, N(0, 1/sqrt(d_model)) so the first logits have unit scale (0.022 at
        width 2048: Qwen's 0.02). Mixer-specific parameters (decay rates, step sizes, convolutions,
        norms) keep their own initialisation."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, Experts)):
                module.reset_parameters()
        outputs = [projection for block in self.layers for projection in block.mixer.residual_outputs()]
        outputs += [weight for block in self.layers if hasattr(block, "mlp") for weight in block.mlp.residual_weights()]
        for projection in outputs:  # one residual branch each
            weight = projection.weight if isinstance(projection, nn.Module) else projection
            if isinstance(projection, (nn.Linear, torch.Tensor)):
                weight /= len(outputs) ** 0.5
        nn.init.normal_(self.embed.weight, std=self.spec.d_model ** -0.5 if self.spec.tie_embeddings else 1.0)

    def text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [B, T] as this model's mixers take them: [S, B, T] (the same in every
        section) for M-RoPE, else unchanged; [S, B, T] positions pass through."""
        if self.rope_streams and positions.dim() == 2:
            return positions.expand(self.rope_streams, *positions.shape)
        return positions

    def init_state(self, batch_size: int, *, device=None, dtype=None, capacity: int | None = None) -> DecoderState:
        """The state before any token; with `capacity`, growing layer states (full attention) are
        preallocated for that many tokens per row (see DecoderState.with_capacity)."""
        check_count("batch_size", batch_size, minimum=1, owner="Decoder.init_state")
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype if dtype is None else dtype
        layers = [block.mixer.init_state(batch_size, device=device, dtype=dtype) for block in self.layers]
        state = DecoderState(layers, torch.zeros(batch_size, dtype=torch.long, device=device))
        return state if capacity is None else state.with_capacity(capacity)

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write the transformers folder of this model's family, or mixerzoo's own (see blocks.hub); returns
        the model_type written."""
        from mixerzoo.blocks.hub import save_pretrained

        return save_pretrained(self, path)

    def load_state(self, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> DecoderState:
        """A state saved with `state.save(path, model.spec)`."""
        return DecoderState.load(path, self, device=device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over final hidden states [B, T, d_model] -> [B, T, vocab]."""
        weight = self.embed.weight if self.spec.tie_embeddings else self.lm_head.weight
        logits = F.linear(hidden, weight)
        cap = self.spec.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        state: DecoderState | None = None,
        *,
        embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DecoderState | None]:
        """input_ids [B, T] (or embeds [B, T, d_model]) after `state` -> (logits [B, T, vocab], state).

        documents [B, T] (ids non-decreasing along a row, -1 on padding) packs several documents
        per row for training: each is mixed alone from a fresh state (no `state` then, and None
        is returned for it); positions default to the index within the document."""
        if (input_ids is None) == (embeds is None):
            raise ValueError("Decoder: give exactly one of input_ids and embeds")
        if input_ids is not None:
            check_token_ids(input_ids, self.spec.vocab_size, "Decoder")
            embeds = self.embed(input_ids)
        else:
            check_input_dtype(self, embeds, "Decoder: embeds")
        if documents is not None:
            return self._forward_packed(embeds, documents, positions, valid, state)
        batch, length = embeds.shape[:2]
        if state is None:
            state = self.init_state(batch, device=embeds.device, dtype=activation_dtype(embeds))
        elif state.batch_size != batch or len(state.layers) != len(self.layers):
            raise ValueError(f"Decoder: input has batch {batch}, the state has {state.batch_size} rows and "
                             f"{len(state.layers)} layers (the model has {len(self.layers)})")
        if positions is None:  # valid None: every token is real, which the mixers then know without a mask
            steps = torch.arange(length, device=embeds.device) if valid is None else valid.cumsum(1) - 1
            positions = state.seen[:, None] + steps
        positions = self.text_positions(positions)
        x, new_layers = embeds, []
        with _sharing_rotary():  # the layers' rotary tables made once
            for i, (block, layer_state) in enumerate(zip(self.layers, state.layers)):
                try:
                    x, layer_state = block(x, layer_state, positions=positions, valid=valid)
                except (ValueError, TypeError) as error:
                    raise type(error)(f"layer {i} ({block.mixer.config.type}): {error}") from error
                new_layers.append(layer_state)
        seen = state.seen + (length if valid is None else valid.sum(1))
        return self.logits(self.norm(x)), DecoderState(new_layers, seen)

    def _forward_packed(self, embeds, documents, positions, valid, state) -> tuple[torch.Tensor, None]:
        """Logits of packed rows, each document alone (see forward)."""
        if state is not None:
            raise ValueError("Decoder: packed documents start from a fresh state; do not pass `state` with `documents`")
        packing = PackedLayout.from_documents(documents)
        if packing.shape != tuple(embeds.shape[:2]):
            raise ValueError(f"Decoder: documents has shape {list(documents.shape)}, the input {list(embeds.shape[:2])}")
        if valid is not None and not torch.equal(valid, packing.tokens):
            raise ValueError("Decoder: valid must equal documents >= 0 when documents are given")
        positions = self.text_positions(packing.positions if positions is None else positions)
        x = embeds
        with _sharing_rotary():
            for i, block in enumerate(self.layers):
                try:
                    x, _ = block(x, None, positions=positions, documents=packing)
                except (ValueError, TypeError) as error:
                    raise type(error)(f"layer {i} ({block.mixer.config.type}): {error}") from error
        return self.logits(self.norm(x)), None


def random_state(model: Decoder, context: int, *, batch_size: int = 1, scale: float = 0.1) -> DecoderState:
    """A state of the size `context` seen tokens leave, holding small random values: decode cost
    at a long context without the prefill (benchmarks say so when they use it).

    Floating tensors are scale * randn with their `variable_dims` sized `context`; integer
    tensors (token counters) and the model-level counter equal `context`.
    """
    empty = model.init_state(batch_size)

    def fill(layer_state: MixerState) -> MixerState:
        if isinstance(layer_state, CompositeState):
            return CompositeState([fill(branch) for branch in layer_state.parts])
        tensors = {}
        for field in dataclasses.fields(layer_state):
            t = getattr(layer_state, field.name)
            if t.is_floating_point():
                grow = set(field.metadata.get("variable_dims", ()))
                shape = [context if d in grow else size for d, size in enumerate(t.shape)]
                tensors[field.name] = scale * torch.randn(shape, dtype=t.dtype, device=t.device)
            else:
                tensors[field.name] = torch.full_like(t, context)
        return dataclasses.replace(layer_state, **tensors)

    return DecoderState([fill(s) for s in empty.layers], torch.full_like(empty.seen, context))
