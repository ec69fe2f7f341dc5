"""Short causal depthwise convolution over the valid tokens of a stream, with a carried tail."""

from __future__ import annotations

import torch

from mixerzoo.ops._backend import choose_backend


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    tail: torch.Tensor,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv; returns (y [B, T, C], new tail [B, W - 1, C]).

    x [B, T, C]; weight [C, W] (tap W - 1 multiplies the current token); tail [B, W - 1, C]
    holds the last W - 1 valid inputs before this chunk (zeros at the stream start).
    valid None: every token is real. Invalid tokens (valid [B, T] False) are skipped: they neither enter the window nor
    move it, and their output is zero. No activation is applied.
    """
    _check_inputs(x, weight, tail, valid, bias)
    name = choose_backend("causal_conv1d", backend, x, supported=("torch", "reference"))
    if valid is None and name == "reference":
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return _BACKENDS[name](x, weight, tail, valid, bias)


def _check_inputs(x, weight, tail, valid, bias) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, C], got shape {list(x.shape)}")
    batch, length, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"causal_conv1d: weight must be [C={channels}, W], got shape {list(weight.shape)}")
    want = (batch, weight.shape[1] - 1, channels)
    if tuple(tail.shape) != want:
        raise ValueError(f"causal_conv1d: tail must be [B, W - 1, C] = {list(want)}, got {list(tail.shape)}")
    if valid is not None and (valid.shape != (batch, length) or valid.dtype != torch.bool):
        raise ValueError(f"causal_conv1d: valid must be bool [{batch}, {length}], got {valid.dtype} {list(valid.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"causal_conv1d: bias must be [{channels}], got {list(bias.shape)}")


def _reference(x, weight, tail, valid, bias):
    """A loop over time: each valid token forms a window with the tail, then joins the tail."""
    ys = []
    for t in range(x.shape[1]):
        window = torch.cat([tail, x[:, t : t + 1]], dim=1)  # [B, W, C]
        y = torch.einsum("bwc,cw->bc", window, weight) + (0 if bias is None else bias)
        ys.append(y * valid[:, t, None])
        tail = torch.where(valid[:, t, None, None], window[:, 1:], tail)
    return torch.stack(ys, dim=1), tail


def _step(x, weight, tail, valid, bias):
    """One token (decode): its window is the tail and itself; a pad outputs zero and keeps the tail."""
    window = torch.cat([tail, x], dim=1)  # [B, W, C]
    y = (window * weight.t()).sum(1, keepdim=True)  # [B, 1, C]
    if bias is not None:
        y = y + bias
    if valid is None:
        return y, window[:, 1:]
    keep = valid[:, :, None]  # [B, 1, 1]
    return y * keep, torch.where(keep, window[:, 1:], tail)


def _torch(x, weight, tail, valid, bias):
    """Move each row's valid tokens to the front (in order), convolve after the tail, scatter back;
    a single token (decode) takes the one-step form."""
    if x.shape[1] == 1:
        return _step(x, weight, tail, valid, bias)
    taps = weight.shape[1]
    if valid is None:  # every token real: a plain causal conv after the tail
        packed = torch.cat([tail, x], dim=1)  # [B, W - 1 + T, C]
        y = sum(packed[:, j : j + x.shape[1]] * weight[:, j] for j in range(taps))
        return (y if bias is None else y + bias), packed[:, packed.shape[1] - taps + 1 :]
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # [B, T]: valid first
    packed = torch.cat([tail, x.gather(1, order[..., None].expand_as(x))], dim=1)  # [B, W - 1 + T, C]
    length = x.shape[1]
    y = sum(packed[:, j : j + length] * weight[:, j] for j in range(taps))  # [B, T, C]: depthwise, few taps
    if bias is not None:
        y = y + bias
    n_valid = valid.sum(1)  # [B]
    y = y * (torch.arange(x.shape[1], device=x.device) < n_valid[:, None])[..., None]  # packed pads -> 0
    out = torch.zeros_like(y).scatter(1, order[..., None].expand_as(y), y)
    # new tail: the W - 1 packed inputs ending at each row's last valid token
    index = n_valid[:, None] + torch.arange(taps - 1, device=x.device)  # [B, W - 1]
    new_tail = packed.gather(1, index[..., None].expand(-1, -1, x.shape[2]))
    return out, new_tail


_BACKENDS = {"reference": _reference, "torch": _torch}
