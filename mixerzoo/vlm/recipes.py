"""VLM recipes: every decoder recipe with a Qwen2.5-VL vision tower, at tiny / small / paper size."""

from __future__ import annotations

from mixerzoo.blocks import LayoutSpec
from mixerzoo.registry import SIZES, list_recipes, recipe
from mixerzoo.vlm.model import VLMSpec
from mixerzoo.vlm.processor import ProcessorConfig
from mixerzoo.vlm.vision import VisionConfig

# "qwen2.5-vl" is the transformer recipe with the vision tower: Qwen2.5-VL-3B at paper size.
_ALIASES = {"qwen2.5-vl": "transformer"}
_VISION = {
    "tiny": dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56, fullatt_block_indexes=(1,)),
    "small": dict(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, window_size=112,
                  fullatt_block_indexes=(1, 3)),
    "paper": dict(),  # VisionConfig's defaults are Qwen2.5-VL-3B's tower
}


def list_vlm_recipes() -> list[str]:
    """Names accepted by `vlm_recipe`."""
    return sorted([*list_recipes(), *_ALIASES])


def with_mrope(decoder: LayoutSpec) -> LayoutSpec:
    """Rotary layers (a parallel layer's branches too) switched to M-RoPE (sections t:h:w = 2:3:3 of the rotated
    dims / 2), theta and the rotated share kept; NoPE layers stay NoPE."""
    def switched(mixer, data: dict) -> dict:
        if mixer.type == "parallel":
            return {**data, "mixers": [switched(m, d) for m, d in zip(mixer.mixers, data["mixers"])]}
        rope = data.get("rope")
        if rope is None or rope["kind"] != "rope":
            return data
        half = mixer.rotary_dim // 2
        return {**data, "rope": {**rope, "kind": "mrope", "sections": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]}}

    layers = [{**layer.model_dump(), "mixer": switched(layer.mixer, layer.mixer.model_dump())} for layer in decoder.layers]
    return LayoutSpec.model_validate({**decoder.model_dump(exclude={"layers"}), "layers": layers})


def vlm_recipe(name: str, size: str = "tiny") -> VLMSpec:
    """The VLM of decoder recipe `name` at `size` (token ids at the top of small vocabularies)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {SIZES}")
    decoder = with_mrope(recipe(_ALIASES.get(name, name), size))
    processor = ProcessorConfig()
    if decoder.vocab_size <= processor.video_pad_id:
        top = decoder.vocab_size
        processor = ProcessorConfig(vision_start_id=top - 4, vision_end_id=top - 3, image_pad_id=top - 2, video_pad_id=top - 1)
    vision = VisionConfig(**_VISION[size], out_hidden_size=decoder.d_model)
    return VLMSpec(decoder=decoder, vision=vision, processor=processor)
