"""Certify the installed `ema` mixer against mixerzoo's protocol, then use it in a hybrid from YAML.

    pip install -e examples/mixerzoo-ema && python examples/mixerzoo-ema/certify_ema.py
"""

import torch

import mixerzoo as mz
from mixerzoo.testing import certify

assert "ema" in mz.registry.list_mixers(), "install the package first: pip install -e examples/mixerzoo-ema"
certify({"type": "ema", "d_model": 8})  # every invariant, float64; raises AssertionError on the first failure
certify({"type": "ema", "d_model": 8}, dtype=torch.float32)
spec = mz.LayoutSpec.from_yaml("""
d_model: 32
vocab_size: 64
pattern: ES
legend:
  E: {type: ema, init_decay: 0.95}
  S: {type: attention, n_heads: 2, window: 8}
mlp: {hidden: 64}
""")
model = mz.Decoder(spec)
logits, state = model(torch.randint(64, (2, 10)))
print(f"ema certified; an ES hybrid runs: logits {list(logits.shape)}, state {state.nbytes} bytes")
