"""The MQAR control experiment of the initialisation study (docs/studies/initialisation.md).

Trains one model on MQAR with tasks.loop.fit and prints its held-out accuracy every
`--every` steps as one JSON line: either the independent control (mixerzoo.testing.ControlLM,
no mixerzoo model code) or a Decoder of a recipe's first `--layers` layers under an
initialisation:

    scheme    Decoder.init_weights (this project's one scheme)
    gpt2      every Linear and the embeddings N(0, 0.02), residual projections / sqrt(branches)
    old       main before the fix: PyTorch's Linear default, embeddings N(0, 0.02), no depth scaling

    python experiments/mqar_control.py --model control
    python experiments/mqar_control.py --model control --mixing linear --width 32 --heads 2   # the atlas's control
    python experiments/mqar_control.py --model decoder --pattern F --init gpt2 --tie
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from mixerzoo.blocks import Decoder, LayoutSpec
from mixerzoo.registry.recipes import layout
from mixerzoo.tasks.loop import fit
from mixerzoo.tasks.mqar import MQARConfig, evaluate_mqar, make_mqar
from mixerzoo.testing import ControlLM


def reinitialise(model: Decoder, init: str) -> None:
    """Replace Decoder.init_weights by the `gpt2` or `old` variant (see the module docstring)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                if init == "gpt2":
                    nn.init.normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                else:
                    module.reset_parameters()
        if init == "gpt2":
            outputs = [getattr(b.mixer, b.mixer.residual_projection) for b in model.layers]
            outputs += [b.mlp.down_proj for b in model.layers if hasattr(b, "mlp")]
            for projection in outputs:
                projection.weight /= len(outputs) ** 0.5
        nn.init.normal_(model.embed.weight, std=0.02)


def main() -> None:
    """Parse the options, train, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["control", "decoder"], default="decoder")
    parser.add_argument("--mixing", choices=["softmax", "linear"], default="softmax", help="the control's attention")
    parser.add_argument("--width", type=int, default=64, help="the control's d_model")
    parser.add_argument("--heads", type=int, default=4, help="the control's heads")
    parser.add_argument("--pattern", default="F", help="recipe letters (tiny legend): F, S, G, M")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--init", choices=["scheme", "gpt2", "old"], default="scheme")
    parser.add_argument("--tie", action="store_true", help="tie the LM head to the embeddings")
    parser.add_argument("--vocab", type=int, default=192)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = MQARConfig(vocab_size=args.vocab, seq_len=args.seq, n_pairs=args.pairs)
    torch.manual_seed(args.seed)
    if args.model == "control":
        model = ControlLM(args.vocab, d_model=args.width, n_heads=args.heads, mixing=args.mixing)
    else:
        data = layout("tiny", pattern=args.pattern).model_dump(mode="json")
        data.update(layers=data["layers"][:args.layers], vocab_size=args.vocab, tie_embeddings=args.tie)
        model = Decoder(LayoutSpec.model_validate(data))
        if args.init != "scheme":
            reinitialise(model, args.init)
    inputs, labels = make_mqar(task, args.steps * args.batch, args.seed)
    log = []

    def batch(step: int) -> dict[str, torch.Tensor]:
        if step and step % args.every == 0:
            log.append((step, round(evaluate_mqar(model, task, 256, args.seed + 2**32), 3)))
        rows = slice(step * args.batch, (step + 1) * args.batch)
        return {"input_ids": inputs[rows], "labels": labels[rows]}

    start = time.perf_counter()
    trained = fit(model, batch, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay)
    log.append((args.steps, round(evaluate_mqar(model, task, 512, args.seed + 2**32), 3)))
    print(json.dumps(dict(vars(args), accuracy=log, final_loss=round(trained["final_loss"], 4),
                          seconds=round(time.perf_counter() - start))))


if __name__ == "__main__":
    main()
