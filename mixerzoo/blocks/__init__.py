"""Blocks that compose mixers into models: the layout spec, the channel mixers (SwiGLU, Experts), the residual
Block, the Decoder."""

from mixerzoo.blocks.costs import flops_per_token, parameter_count, state_nbytes
from mixerzoo.blocks.cuda_graph import GraphDecoder
from mixerzoo.blocks.decoder import Block, Decoder, DecoderState, random_state
from mixerzoo.blocks.mlp import Experts, SwiGLU
from mixerzoo.blocks.hub import from_pretrained, save_pretrained
from mixerzoo.blocks.generate import STOPPED, compiled_step, continue_stream, generate, prefill, sample, stream
from mixerzoo.blocks.spec import LayerSpec, LayoutSpec, MLPSpec

__all__ = [
    "STOPPED", "Block", "Experts", "compiled_step", "continue_stream", "Decoder", "DecoderState", "GraphDecoder", "LayerSpec", "LayoutSpec", "MLPSpec", "SwiGLU", "flops_per_token",
    "from_pretrained", "generate", "parameter_count", "prefill", "random_state", "sample", "save_pretrained", "state_nbytes", "stream",
]
