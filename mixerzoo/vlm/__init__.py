"""Vision-language models: Qwen2.5-VL vision tower, processor, M-RoPE positions, the VLM over any
decoder layout, Hugging Face import / conversion, and streaming video sessions."""

from mixerzoo.vlm.model import VLM, VLMSpec, VLMState, generate_vlm, load_vlm, save_vlm
from mixerzoo.vlm.positions import MRopeState, mrope_positions
from mixerzoo.vlm.processor import (
    ProcessorConfig, VideoFrames, expand_vision_tokens, process_images, process_video, read_video,
)
from mixerzoo.vlm.recipes import list_vlm_recipes, vlm_recipe
from mixerzoo.vlm.stream import StreamSession, StreamStats
from mixerzoo.vlm.vision import VisionConfig, VisionTower

__all__ = [
    "MRopeState", "ProcessorConfig", "StreamSession", "StreamStats", "VLM", "VLMSpec", "VLMState", "VideoFrames",
    "VisionConfig", "VisionTower", "expand_vision_tokens", "generate_vlm", "list_vlm_recipes", "load_vlm", "mrope_positions", "process_images",
    "process_video", "read_video", "save_vlm", "vlm_recipe",
]
