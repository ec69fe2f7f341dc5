"""mixerzoo: token mixers that all speak one recurrent-state protocol, composed into hybrid models."""

from mixerzoo import ops, registry
from mixerzoo.mixers import Attention, AttentionConfig, Mixer, MixerConfig, MixerState

__all__ = ["Attention", "AttentionConfig", "Mixer", "MixerConfig", "MixerState", "ops", "registry"]
