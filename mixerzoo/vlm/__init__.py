"""Vision-language models (vision tower, M-RoPE positions, processor, streaming).

Empty until the VLM issue lands; the M-RoPE angles already live in mixerzoo.ops.
"""
