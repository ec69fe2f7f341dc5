"""An independent control model: a minimal causal-attention LM written without any mixerzoo code.

A study whose mixerzoo models fail a task should first check that this plain model (token and
learned position embeddings at PyTorch's defaults, pre-LayerNorm blocks, fused qkv, SDPA, an
optional GELU MLP, an untied head) learns it with the same data and loop: if it does and ours
does not, the defect is in our model path, not in the task or the protocol. With `mixing="linear"`
its blocks are Katharopoulos et al.'s causal linear attention (feature map elu + 1, normalised by the
features' running sum), written as a masked quadratic form: the control for a linear-attention
family's failure (does the class fail here, or does our code?).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ControlBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp: bool, mixing: str):
        super().__init__()
        self.n_heads, self.linear = n_heads, mixing == "linear"
        self.attn_norm, self.qkv, self.out = nn.LayerNorm(d_model), nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model)) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, T, D] each
        if self.linear:
            scores = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)  # [B, H, T, T], positive
            scores = scores * torch.ones(length, length, device=x.device).tril()
            mixed = scores @ v / scores.sum(-1, keepdim=True)
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mixed = mixed.transpose(1, 2).reshape(batch, length, width)
        x = x + self.out(mixed)
        return x + self.mlp(x) if self.mlp is not None else x


class ControlLM(nn.Module):
    """`logits, None = model(input_ids [B, T])`: n_layers pre-LayerNorm causal softmax-attention (or linear
    attention) blocks with learned absolute positions, the call signature of a Decoder forward without state."""

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 max_len: int = 1024, mlp: bool = False, mixing: str = "softmax"):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab_size, d_model), nn.Embedding(max_len, d_model)
        if mixing not in ("softmax", "linear"):
            raise ValueError(f"ControlLM mixing must be 'softmax' or 'linear', got {mixing!r}")
        self.blocks = nn.ModuleList(_ControlBlock(d_model, n_heads, mlp, mixing) for _ in range(n_layers))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        """input_ids [B, T] -> (logits [B, T, vocab], None)."""
        x = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)), None
