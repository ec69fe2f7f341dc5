"""Token mixers: modules of (chunk, state) that all follow the recurrent-state protocol."""

from mixerzoo.mixers.attention import Attention, AttentionConfig, KVCache, RingKVCache, RopeConfig
from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState

__all__ = [
    "Attention", "AttentionConfig", "KVCache", "Mixer", "MixerConfig", "MixerState", "RingKVCache", "RopeConfig",
]
