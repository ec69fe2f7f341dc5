"""Streaming video: frames are prefilled into one running state; questions fork it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from mixerzoo.blocks import STOPPED, compiled_step, continue_stream
from mixerzoo.vlm.model import VLM, VLMState
from mixerzoo.vlm.processor import expand_vision_tokens, process_video, smart_resize


@dataclass
class StreamStats:
    """Per-frame prefill latency and state size of a session."""

    frame_seconds: list[float] = field(default_factory=list)
    state_nbytes: list[int] = field(default_factory=list)
    frame_tokens: list[int] = field(default_factory=list)  # visual tokens each frame added

    @property
    def frames(self) -> int:
        """Frames pushed so far."""
        return len(self.frame_seconds)

    @property
    def fps(self) -> float:
        """Frames per second of prefill (processing and the model) over all frames pushed; a caller
        that also decodes the video reports frames / wall time instead (the `stream` command does)."""
        total = sum(self.frame_seconds)
        return self.frames / total if total else 0.0


class StreamSession:
    """A video stream held in one VLM state of batch 1.

    Each pushed frame becomes its own video block, resized (aspect kept, Qwen's smart_resize) to at
    most frame_size x frame_size pixels: a square frame gives (frame_size / 28)^2 visual tokens (64 at
    the default 224), a 480 x 640 one 6 x 9 = 54 (`tokens_for`). Its temporal M-RoPE positions continue
    from the stream; `ask` answers on a fork and leaves the stream untouched.

    compile=True runs each frame and each answer's decode steps as compiled programs (`compiled_step`:
    one per frame size, made on the first frame of that size). A model with full-attention layers then
    needs `capacity`, the tokens its caches hold (frames x (tokens per frame + 2) plus the questions).
    """

    def __init__(self, model: VLM, *, frame_size: int = 224, fps: float = 2.0, compile: bool = False,
                 capacity: int | None = None):
        factor = model.spec.processor.patch_size * model.spec.processor.merge_size
        if frame_size % factor:
            raise ValueError(f"StreamSession: frame_size must be a multiple of {factor}, got {frame_size}")
        self.model = model
        self.device = model.decoder.embed.weight.device
        self.fps = fps
        self.compile = compile
        self.processor = model.spec.processor.model_copy(
            update={"video_min_pixels": frame_size * frame_size, "video_max_pixels": frame_size * frame_size}
        )
        growing = any(layer.mixer.type == "attention" and layer.mixer.window is None for layer in model.spec.decoder.layers)
        if compile and growing and capacity is None:
            raise ValueError("StreamSession: compile=True with full-attention layers needs capacity= (the tokens "
                             "the stream's caches hold)")
        self.capacity = capacity if compile and growing else None  # host-side limit of a static cache
        with torch.inference_mode():  # as every state a step makes (a compiled step's guards see no difference)
            self.state: VLMState = model.init_state(1, device=self.device, capacity=self.capacity)
        self._step = compiled_step(model) if compile else model
        self._tokens = 0  # tokens pushed so far (host int)
        self.stats = StreamStats()

    def grid_for(self, height: int, width: int) -> tuple[int, int, int]:
        """The video grid (t, h, w in patches) of one height x width frame, as host ints."""
        p = self.processor
        h, w = smart_resize(height, width, p.factor, min_pixels=p.video_min_pixels, max_pixels=p.video_max_pixels)
        return 1, h // p.patch_size, w // p.patch_size

    def tokens_for(self, height: int, width: int) -> int:
        """Visual tokens a height x width frame adds."""
        t, h, w = self.grid_for(height, width)
        return t * h * w // self.processor.merge_size**2

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens the last pushed frame added (before any frame: a square frame_size frame's)."""
        if self.stats.frame_tokens:
            return self.stats.frame_tokens[-1]
        side = int(self.processor.video_max_pixels**0.5)
        return self.tokens_for(side, side)

    @torch.inference_mode()
    def push_frames(self, frames: np.ndarray | Sequence[np.ndarray]) -> None:
        """Prefill frames ([T, H, W, 3] uint8, or a list of [H, W, 3]) into the running state; each
        frame's time counts until its work on the device is done."""
        for frame in frames:
            start = time.perf_counter()
            frame = np.asarray(frame)
            pixels, _, seconds = process_video(frame[None], self.processor, fps=self.fps)
            grid = [self.grid_for(*frame.shape[:2])]  # host ints: the step never reads a grid back
            ids = expand_vision_tokens(["video"], video_grid_thw=grid, config=self.processor)
            if self.capacity is not None and self._tokens + len(ids) > self.capacity:
                raise ValueError(f"StreamSession: frame {self.stats.frames + 1} would take the stream to "
                                 f"{self._tokens + len(ids)} tokens, past its capacity of {self.capacity}")
            self._tokens += len(ids)
            ids = torch.tensor([ids]).to(self.device, non_blocking=True)
            pixels = pixels.to(self.device, non_blocking=True)
            _, self.state = self._step(ids, self.state, pixel_values_videos=pixels, video_grid_thw=grid,
                                       second_per_grid_ts=[seconds])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stats.frame_seconds.append(time.perf_counter() - start)
            self.stats.state_nbytes.append(self.state.nbytes)
            self.stats.frame_tokens.append(ids.shape[1] - 2)  # between vision_start and vision_end

    @torch.inference_mode()
    def ask(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 32, stop_tokens: Sequence[int] = ()) -> list[int]:
        """Greedy answer to a tokenised question, computed on a fork of the stream's state."""
        fork = self.state.clone()
        logits, fork = self.model(torch.tensor([list(prompt_ids)], device=self.device), fork)
        answer = []
        for token in continue_stream(self.model, logits[:, -1].float(), fork, max_new_tokens=max_new_tokens,
                                     stop_tokens=stop_tokens, compile=self.compile):
            if int(token) == STOPPED:
                break
            answer.append(int(token))
        return answer

    def save(self, path: str | os.PathLike) -> None:
        """Persist the stream's memory (its state) atomically."""
        self.state.save(path, self.model.spec)

    def load(self, path: str | os.PathLike) -> None:
        """Continue from a memory saved with `save` (refused if it was saved for another model spec)."""
        state = self.model.load_state(path, device=self.device)
        self._tokens = int(state.seen.max())
        self.state = state if self.capacity is None else state.with_capacity(self.capacity)
