"""fla adaptors against our reference with fla's own Triton kernels run by Triton's CPU interpreter
(TRITON_INTERPRET=1): argument order and layouts checked without a GPU, for the kernels the interpreter
can run (fused recurrent gated delta rule: the T = 1 decode path; parallel attention). fla's chunked
kernels do not run in the interpreter; tests/test_cuda_backends.py checks them on CUDA."""

import pytest

SCRIPT = r"""
import importlib
import torch
import torch.nn.functional as F

from mixerzoo.ops import attention, gated_delta_rule

gdr = importlib.import_module("mixerzoo.ops.gated_delta_rule")
attn = importlib.import_module("mixerzoo.ops.attention")
torch.manual_seed(0)
tol = dict(rtol=1e-5, atol=1e-5)  # float32 on both sides, summation order aside

# T = 1 decode, grouped value heads (H = 1, HV = 2), a nonzero initial state
q, k = (F.normalize(torch.randn(2, 1, 1, 16), dim=-1) for _ in range(2))
v = torch.randn(2, 1, 2, 16)
g, beta = F.logsigmoid(torch.randn(2, 1, 2)), torch.sigmoid(torch.randn(2, 1, 2))
h0 = torch.randn(2, 2, 16, 16)
with torch.no_grad():
    o, state = gdr._fla(q, k, v, g, beta, 16 ** -0.5, h0, 64)
want_o, want_state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, backend="reference")
torch.testing.assert_close(o, want_o, **tol)
torch.testing.assert_close(state, want_state, **tol)

# parallel attention, GQA (4 query heads over 2 KV heads), full and sliding window
q = torch.randn(2, 40, 4, 16)
k, v = torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
for window in (None, 8):
    torch.testing.assert_close(attn._fla(q, k, v, window, 0.25), attention(q, k, v, window, 0.25, backend="reference"),
                               **tol)
print("ok")
"""


def test_fla_adaptors_under_the_triton_interpreter(triton_interpreter):
    pytest.importorskip("fla.ops", reason="fla-core (the oracle extra) is not installed")
    triton_interpreter(SCRIPT)
