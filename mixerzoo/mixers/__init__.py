"""Token mixers: modules of (chunk, state) that all follow the recurrent-state protocol."""

from mixerzoo.mixers.attention import Attention, AttentionConfig, KVCache, RingKVCache, RopeConfig
from mixerzoo.mixers.base import CompositeState, Mixer, MixerConfig, MixerState
from mixerzoo.mixers.elementwise_family import PRESETS as ELEMENTWISE_PRESETS
from mixerzoo.mixers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetState
from mixerzoo.mixers.hyena import Hyena, HyenaConfig
from mixerzoo.mixers.linear_family import PRESETS as LINEAR_PRESETS
from mixerzoo.mixers.linear_family import LinearMixer, LinearMixerConfig, LinearMixerState
from mixerzoo.mixers.mamba2 import Mamba2, Mamba2Config, Mamba2State
from mixerzoo.mixers.mla import MLA, MLAConfig
from mixerzoo.mixers.parallel import Parallel, ParallelConfig
from mixerzoo.mixers.rwkv import RWKV6, RWKV7, RWKV6Config, RWKV7Config, RWKVState
from mixerzoo.mixers.registry import build_mixer, list_mixers, mixer_class, mixer_config, register_mixer

for _builtin in (Attention, GatedDeltaNet, Mamba2, *LINEAR_PRESETS, *ELEMENTWISE_PRESETS, RWKV6, RWKV7, MLA, Hyena, Parallel):
    register_mixer(_builtin)

__all__ = [
    "Attention", "AttentionConfig", "GatedDeltaNet", "GatedDeltaNetConfig", "GatedDeltaNetState", "Hyena", "HyenaConfig", "KVCache", "LinearMixer", "LinearMixerConfig", "LinearMixerState", "MLA", "MLAConfig",
    "Mamba2", "Mamba2Config", "Mamba2State", "Mixer", "MixerConfig", "MixerState", "CompositeState", "Parallel", "ParallelConfig", "RWKV6", "RWKV6Config", "RWKV7", "RWKV7Config", "RWKVState", "RingKVCache", "RopeConfig",
    "build_mixer", "list_mixers", "mixer_class", "mixer_config", "register_mixer",
]
