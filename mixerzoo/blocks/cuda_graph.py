"""T = 1 decode of a Decoder as one captured CUDA graph, replayed once per token.

The graph reads a static token buffer, runs the model, and writes the new state back into
static state buffers and the logits into a static logits buffer, all on the device: no
host sync per token (every count a step needs lives in the state, on the device). Every
shape must be fixed: sliding-window, Gated DeltaNet and Mamba2 states are; a full-attention
KV cache is preallocated for `capacity` tokens (a StaticKVCache, written in place).
"""

from __future__ import annotations


import torch

from mixerzoo.blocks.decoder import Decoder, DecoderState


def check_fixed_shapes(model: Decoder, state: DecoderState) -> None:
    """Raise ValueError naming the first layer whose state grows with the tokens seen (a full-attention
    KVCache not yet given a capacity)."""
    for i, (block, layer) in enumerate(zip(model.layers, state.layers)):
        growing = layer.growing_fields()
        if growing:
            raise ValueError(
                f"GraphDecoder: layer {i} ({block.mixer.config.type}) keeps a state that grows with every token "
                f"(fields {growing}), which a CUDA graph cannot hold; pass capacity=N (the most tokens a row will "
                "hold) to preallocate it, or decode this model eagerly"
            )


class GraphDecoder:
    """T = 1 decode of `model` from a copy of `state`, one CUDA graph replay per token.

    `capacity` preallocates full-attention caches for that many tokens per row (required when the
    model has full-attention layers; a step past it is an error raised on the device).

    `step(tokens)` feeds one token per row and returns the next-token logits; `generate`
    decodes greedily. The state is held in static buffers (`self.state`), advanced in place.
    With capture=False (the default off CUDA) the same static-buffer step runs eagerly, so
    CPU tests compare it with the model's own decode.
    """

    def __init__(self, model: Decoder, state: DecoderState, *, capacity: int | None = None,
                 capture: bool | None = None, warmup: int = 2):
        self.model, self.capacity = model, capacity
        device = state.seen.device
        if model.embed.weight.device != device:
            raise ValueError(f"GraphDecoder: the model is on {model.embed.weight.device}, the state on {device}")
        with torch.inference_mode():
            self.state = state.clone() if capacity is None else state.clone().with_capacity(capacity)  # static buffers
            check_fixed_shapes(model, self.state)
            self._buffers = self.state.flat_tensors()
            self.tokens = torch.zeros(state.batch_size, 1, dtype=torch.long, device=device)
            self.logits = torch.zeros(state.batch_size, model.spec.vocab_size, dtype=model.embed.weight.dtype,
                                      device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type == "cuda" if capture is None else capture:
            self._capture(warmup)

    def _step(self) -> None:
        """One token per row from the static buffers back into them (what the graph captures)."""
        logits, new = self.model(embeds=self.model.embed(self.tokens), state=self.state)
        for name, tensor in new.flat_tensors().items():
            if tensor is not self._buffers[name]:  # a static KV cache was written in place
                self._buffers[name].copy_(tensor)
        self.logits.copy_(logits[:, 0])

    @torch.inference_mode()
    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream (kernel compiles and autotuning happen here), capture one step,
        then restore the state the warm-up advanced."""
        if self.tokens.device.type != "cuda":
            raise ValueError(f"GraphDecoder: capture needs the model and state on CUDA, got {self.tokens.device}")
        saved = self.state.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.reset(saved)

    @torch.inference_mode()
    def reset(self, state: DecoderState) -> None:
        """Continue from `state` (same model, batch and shapes) without capturing again."""
        if self.capacity is not None:
            state = state.with_capacity(self.capacity)
        tensors = state.flat_tensors()
        if tensors.keys() != self._buffers.keys():
            raise ValueError("GraphDecoder.reset: the state's layers differ from the captured model's")
        for name, buffer in self._buffers.items():
            if tensors[name].shape != buffer.shape:
                raise ValueError(f"GraphDecoder.reset: {name} has shape {list(tensors[name].shape)}, "
                                 f"the buffers {list(buffer.shape)}")
            buffer.copy_(tensors[name])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] (one per row, on the state's device); returns logits [B, vocab], the static
        buffer that the next step overwrites (clone it to keep it)."""
        self.tokens.copy_(tokens.view(-1, 1))
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        return self.logits

    @torch.inference_mode()
    def generate(self, logits: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy tokens [B, max_new_tokens] after next-token logits [B, vocab] (as `continue_stream` at
        temperature 0 with no stop tokens). Every token is fed, so the held state ends after the last
        one and `self.logits` predicts the next. Tokens stay on the device until the end."""
        if max_new_tokens < 1:
            raise ValueError(f"GraphDecoder.generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        token = logits.argmax(-1)
        tokens = []
        for _ in range(max_new_tokens):
            tokens.append(token)
            token = self.step(token).argmax(-1)
        return torch.stack(tokens, dim=1)
