"""Acceptance and speed-up of decoding with a draft, on the CPU or a GPU: a recipe's small model (random weights)
as the target, and as the draft its own first layers with its final norm and head (self-speculation, as
LayerSkip's early exit); greedy, so the tokens must equal the target's own.

    python experiments/speculative.py --recipe infinitevl --draft-layers 2 --tokens 64 --threads 1
    python experiments/speculative.py --recipe infinitevl --device cuda --tokens 128   # experiments/gpu_check.sh
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mixerzoo as mz
from mixerzoo.blocks.speculative import speculative_generate
from mixerzoo.registry import recipe


def early_exit(model: mz.Decoder, n_layers: int) -> mz.Decoder:
    """The first `n_layers` of `model` with its embeddings, final norm and head (copies of its weights)."""
    spec = mz.LayoutSpec.model_validate({**model.spec.model_dump(exclude={"layers"}),
                                         "layers": [layer.model_dump() for layer in model.spec.layers[:n_layers]]})
    draft = mz.Decoder(spec).to(model.embed.weight.device)
    weights = {k: v for k, v in copy.deepcopy(model.state_dict()).items()
               if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    draft.load_state_dict(weights)
    return draft.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="infinitevl")
    parser.add_argument("--size", default="small")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    target = mz.Decoder(recipe(args.recipe, args.size)).to(device).eval()
    draft = early_exit(target, args.draft_layers)
    prompt = torch.randint(0, target.spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(args.seed)).to(device)

    def timed(call):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    mz.generate(target, prompt, max_new_tokens=4)  # warm-up
    speculative_generate(target, draft, prompt, max_new_tokens=4, draft_tokens=2)
    expected, alone = timed(lambda: mz.generate(target, prompt, max_new_tokens=args.tokens))
    print(f"{args.recipe} {args.size}, {len(target.layers)} layers; draft: its first {args.draft_layers}; "
          f"{args.tokens} greedy tokens, on {args.device}" + (f", {args.threads} thread(s)" if device.type == "cpu" else ""))
    print(f"target alone: {alone:.3f} s")
    for n in args.draft_tokens:
        result, seconds = timed(lambda: speculative_generate(target, draft, prompt, max_new_tokens=args.tokens,
                                                              draft_tokens=n))
        assert torch.equal(result.tokens, expected), "the draft changed the greedy tokens"
        print(f"draft_tokens {n}: {seconds:.3f} s, speed-up {alone / seconds:.2f}x, acceptance "
              f"{result.acceptance:.2f}, target calls {result.target_calls} (alone: {args.tokens})")


if __name__ == "__main__":
    main()
