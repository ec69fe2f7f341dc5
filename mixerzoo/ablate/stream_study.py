"""The `stream-memory` study: recall of a key frame from early in a video stream, against distance.

One run builds the VLM of the run's recipe (overrides applied to its decoder, as in
`visual-recall`), trains it on fresh stream-recall batches
(`mixerzoo.tasks.visual.make_stream_recall`: noise frames, digit key frames early, a
question at the end) and evaluates answer accuracy on examples from another seed. Sweep
`settings.gap_frames` to sweep the distance. Settings (unknown keys are an error):

    (the fields of `StreamMemorySettings`, each with its meaning: `mixerzoo mixers`, docs/CONFIG.md)

and the training settings every VLM recall study shares (`VLMTaskSettings`, listed in
`visual_study`): digits, image_size, tower, tower_steps, steps, lr, warmup_steps, batch_size, eval_examples, scale.

Row columns: accuracy (per answer token; chance is 0.1), final_loss, initial_loss, steps,
distance and distance_max (tokens from the asked key frame's last visual token to the
question's arrow, smallest and largest over the evaluation set), gap_frames,
stream_tokens (sequence length), swa_window, state_bytes (bfloat16 decoder state after
`stream_tokens`: constant in distance for windowed and recurrent recipes, linear for full
attention), parameters (vision tower included), tower, tower_accuracy, train_seconds, threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from mixerzoo.ablate.mqar_study import swa_window
from mixerzoo.ablate.studies import RunConfig, register_study
from mixerzoo.ablate.visual_study import DIGIT_CHANCE, VLMTaskSettings, plot_accuracy_vs_distance, train_and_score, vlm_spec
from mixerzoo.blocks import state_nbytes
from mixerzoo.tasks.visual import StreamRecallConfig, make_stream_recall, sized_processor


class StreamMemorySettings(VLMTaskSettings):
    """The `stream-memory` study's settings (a run's `settings`), validated: a misspelt key is an error."""

    gap_frames: int = Field(8, ge=0,
        description="noise slots (one visual token each at image_size 28) between the key frame and the question")
    n_keys: int = Field(1, ge=1, le=16, description="key frames; the question asks about one of them")
    lead_frames: int = Field(1, ge=0, description="noise slots before the first key frame")

    def tokens_per_example(self, spec) -> int:
        """Noise and key frame slots (one visual token each at 28 px, plus start / end tokens) and the question."""
        slots = self.lead_frames + self.n_keys + self.gap_frames
        return slots * ((self.image_size // 28) ** 2 + 2) + 4 + self.digits


@register_study("stream-memory", settings=StreamMemorySettings, plot=plot_accuracy_vs_distance,
                chance=lambda row: DIGIT_CHANCE)
def stream_memory_study(run: RunConfig, scratch: Path) -> list[dict[str, Any]]:
    """Train the run's VLM on stream recall per the run's settings; one row of accuracy, distance and state bytes."""
    settings = StreamMemorySettings.model_validate(run.settings)
    spec = vlm_spec(run)
    task = StreamRecallConfig(vocab_size=spec.decoder.vocab_size, gap_frames=settings.gap_frames,
                              n_keys=settings.n_keys, lead_frames=settings.lead_frames, digits=settings.digits,
                              image_size=settings.image_size, digit_source=settings.digit_source)
    processor = sized_processor(spec.processor, settings.image_size)
    model, trained, accuracy, held_out, tower = train_and_score(
        run, spec, settings, task, processor,
        lambda n, seed, split: make_stream_recall(task.model_copy(update={"scan_split": split}), n, seed, processor),
        scratch)
    steps = trained["steps"]
    distances = torch.cat([batch["distance"] for batch in held_out])
    tokens = held_out[0]["input_ids"].shape[1]
    return [dict(
        accuracy=accuracy, final_loss=trained["final_loss"], initial_loss=trained["initial_loss"], steps=steps,
        distance=int(distances.min()), distance_max=int(distances.max()), gap_frames=task.gap_frames,
        stream_tokens=tokens, swa_window=swa_window(spec.decoder), state_bytes=state_nbytes(spec.decoder, tokens, dtype=torch.bfloat16),
        parameters=sum(p.numel() for p in model.parameters()), **tower, train_seconds=trained["seconds"],
        threads=torch.get_num_threads(),
    )]
