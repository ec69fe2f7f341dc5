"""mixerzoo: token mixers that all speak one recurrent-state protocol, composed into hybrid models."""

from mixerzoo import ops, registry
from mixerzoo.blocks import Decoder, DecoderState, LayoutSpec, from_pretrained, generate, prefill, save_pretrained, stream
from mixerzoo.mixers import Attention, AttentionConfig, GatedDeltaNet, Mamba2, Mixer, MixerConfig, MixerState

__all__ = [
    "Attention", "AttentionConfig", "Decoder", "DecoderState", "GatedDeltaNet", "LayoutSpec", "Mamba2", "Mixer",
    "MixerConfig", "MixerState", "from_pretrained", "generate", "ops", "prefill", "registry", "save_pretrained", "stream",
]
