"""The channel mixers after each token mixer: SwiGLU, and experts (top-k routed SwiGLU experts with an optional
shared expert: the form of Qwen3-Next, Qwen2-MoE, Mixtral, MiniMax, Jamba and DeepSeek).

Each token goes to the k experts with the largest softmax router probabilities, their outputs summed with
those probabilities (renormalised to sum to 1 over the k, or not, as the model was trained); a shared
SwiGLU expert, optionally scaled by sigmoid(w . x), sees every token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mixerzoo.blocks.spec import MLPSpec
from mixerzoo.mixers.base import fused_linear


_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), with Llama / Qwen parameter names (gate and up run as one matmul); act is
    silu (SwiGLU) or tanh-approximated gelu (GeGLU)."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.activation = _ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> [..., d_model]."""
        gate, up = fused_linear(self, "gate_up", (self.gate_proj, self.up_proj), x).chunk(2, dim=-1)
        return self.down_proj(self.activation(gate) * up)

    def residual_weights(self) -> list[torch.Tensor]:
        """The weights that write into the residual stream (scaled down with depth at init)."""
        return [self.down_proj.weight]


class Experts(nn.Module):
    """Top-k routed SwiGLU experts beside an optional shared SwiGLU expert (transformers' names: `router` is
    their `gate`). Expert weights are stacked: gate_proj, up_proj [E, hidden, d_model], down_proj [E, d_model, hidden].

    A call with tokens x top_k at most n_experts (a decode step) gathers each token's experts' weights and
    makes no host sync; a longer call runs each hit expert on its tokens (one sync, for the token counts)."""

    def __init__(self, d_model: int, spec: MLPSpec):
        super().__init__()
        self.top_k, self.normalize = spec.top_k, spec.normalize_top_k
        self.router = nn.Linear(d_model, spec.n_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(spec.n_experts, spec.hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(spec.n_experts, spec.hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(spec.n_experts, d_model, spec.hidden))
        if spec.shared_hidden is not None:
            self.shared_expert = SwiGLU(d_model, spec.shared_hidden)
        if spec.shared_gate:
            self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
        self.reset_parameters()

    @property
    def n_experts(self) -> int:
        """Number of routed experts."""
        return self.gate_proj.shape[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert's matrices as nn.Linear's default, U(+-1/sqrt(fan_in))."""
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            bound = 1 / math.sqrt(weight.shape[-1])
            weight.uniform_(-bound, bound)

    def residual_weights(self) -> list[torch.Tensor]:
        """The weights that write into the residual stream (scaled down with depth at init)."""
        shared = self.shared_expert.residual_weights() if hasattr(self, "shared_expert") else []
        return [self.down_proj, *shared]

    def active_weights(self) -> int:
        """Routed expert weights one token multiplies (top_k experts' three matrices)."""
        return self.top_k * 3 * self.gate_proj[0].numel()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d_model] -> (weights [N, k] in x's dtype, expert indices [N, k]): the top-k softmax
        probabilities (softmax in at least float32), renormalised over the k when the spec says so."""
        logits = self.router(x)
        probabilities = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights, index = probabilities.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> [..., d_model]."""
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        weights, index = self.route(flat)
        if flat.shape[0] * self.top_k <= self.n_experts:
            out = self._gathered(flat, weights, index)
        else:
            out = self._grouped(flat, weights, index)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(flat)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.view_as(x)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Every token times its own k experts' gathered weights: x [N, D], weights / index [N, k] -> [N, D]."""
        gate = torch.einsum("nd,nkid->nki", x, self.gate_proj[index])
        up = torch.einsum("nd,nkid->nki", x, self.up_proj[index])
        out = torch.einsum("nki,nkdi->nkd", F.silu(gate) * up, self.down_proj[index])  # [N, k, D]
        return torch.einsum("nkd,nk->nd", out, weights)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The (token, slot) pairs sorted by expert, each expert's run as three matmuls: [N, D] -> [N, D]."""
        slots = index.flatten()  # [N k]
        order = slots.argsort(stable=True)  # the slots grouped by expert
        tokens = order // self.top_k
        counts = torch.zeros(self.n_experts, dtype=slots.dtype, device=slots.device).index_add_(
            0, slots, torch.ones_like(slots)).tolist()  # the host sync (bincount would add one)
        outputs = []
        for expert, rows in enumerate(x[tokens].split(counts)):
            if rows.shape[0]:
                hidden = F.silu(rows @ self.gate_proj[expert].T) * (rows @ self.up_proj[expert].T)
                outputs.append(hidden @ self.down_proj[expert].T)
        routed = torch.cat(outputs) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, routed)


def channel_mixer(d_model: int, spec: MLPSpec) -> nn.Module | None:
    """The MLP a layer spec names: SwiGLU, Experts, or None for type 'none'."""
    if spec.type == "swiglu":
        return SwiGLU(d_model, spec.hidden, spec.bias, spec.activation)
    if spec.type == "experts":
        return Experts(d_model, spec)
    return None
