"""The host's work per step, counted: aten calls and host syncs of one T = 1 decode step and of one
stream frame, for mixerzoo's recipes and for transformers' Qwen2 / Qwen3-Next at the same layout.

    python benchmarks/census.py [--out results/census.md]

Counts are exact and deterministic (a dispatch mode, `mixerzoo.testing.census.HostCensus`): they
depend on layer kinds and the layout, not on widths, so the paper's 36-layer layouts are counted
at narrow widths (`narrow`) that a CPU builds in a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.cases import hf_torch_paths, hf_twin, one_norm_eps  # noqa: E402
from mixerzoo.blocks import Decoder, LayoutSpec  # noqa: E402
from mixerzoo.mixers.base import atomic_write_bytes  # noqa: E402
from mixerzoo.registry import list_recipes, recipe  # noqa: E402
from mixerzoo.testing.census import HostCensus  # noqa: E402

PROMPT = 64  # tokens prefilled before the counted step


def narrow(spec: LayoutSpec, *, d_model: int = 128, head_dim: int = 16, vocab_size: int = 512) -> LayoutSpec:
    """`spec`'s layout (layer kinds, head counts, windows, rotary kind) at a narrow width: every
    head `head_dim` wide (M-RoPE sections rescaled), d_model and MLP hidden `d_model`-sized."""
    data = spec.model_dump(mode="json")
    data.update(d_model=d_model, vocab_size=vocab_size)
    for layer in data["layers"]:
        mixer = layer["mixer"]
        mixer["d_model"] = d_model
        if "head_dim" in mixer:
            mixer["head_dim"] = head_dim
        if mixer.get("rope", {}).get("kind") == "mrope":
            half = head_dim // 2
            mixer["rope"]["sections"] = [half - 2 * (half // 3), half // 3, half // 3]
        if mixer["type"] == "mamba2":
            mixer["d_state"] = head_dim
        if layer["mlp"]["type"] == "swiglu":
            layer["mlp"]["hidden"] = 2 * d_model
    return LayoutSpec.model_validate(data)


def decode_census(prompt_step, decode_step) -> HostCensus:
    """The census of one decode step after a PROMPT-token prefill (`prompt_step()` returns the cache)."""
    cache = prompt_step()
    decode_step(cache)  # the first step may build lazy caches; count the second
    cache = prompt_step()
    cache = decode_step(cache)
    with HostCensus() as census:
        decode_step(cache)
    return census


def ours(spec: LayoutSpec) -> HostCensus:
    """One T = 1 decode step of a mixerzoo Decoder."""
    torch.manual_seed(0)
    model = Decoder(spec).eval()
    prompt = torch.randint(spec.vocab_size, (1, PROMPT))
    token = torch.randint(spec.vocab_size, (1, 1))
    with torch.inference_mode():
        return decode_census(lambda: model(prompt)[1], lambda state: model(token, state)[1])


def hf(twin, vocab_size: int) -> HostCensus:
    """One T = 1 decode step of a transformers causal LM (DynamicCache)."""
    prompt = torch.randint(vocab_size, (1, PROMPT))
    token = torch.randint(vocab_size, (1, 1))

    def prefill():
        return twin(input_ids=prompt, use_cache=True).past_key_values

    def step(cache):
        return twin(input_ids=token, past_key_values=cache, use_cache=True).past_key_values

    with torch.inference_mode(), hf_torch_paths():
        return decode_census(prefill, step)


def frame_census(recipe_name: str = "infinitevl", size: int = 224) -> HostCensus:
    """The census of the third frame pushed into a StreamSession of the tiny `recipe_name` VLM."""
    import numpy as np

    from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

    torch.manual_seed(0)
    model = VLM(vlm_recipe(recipe_name, size="tiny")).eval()
    session = StreamSession(model, frame_size=size)
    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    session.push_frames([frame, frame])
    with HostCensus() as census:
        session.push_frames([frame])
    return census


def vlm_decode_census(recipe_name: str = "infinitevl") -> HostCensus:
    """The census of a T = 1 decode step of the tiny `recipe_name` VLM (M-RoPE positions) after a frame."""
    import numpy as np

    from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

    torch.manual_seed(0)
    model = VLM(vlm_recipe(recipe_name, size="tiny")).eval()
    session = StreamSession(model)
    session.push_frames([np.zeros((224, 224, 3), dtype=np.uint8)])
    token = torch.tensor([[5]])
    with torch.inference_mode():
        _, state = model(token, session.state)
        with HostCensus() as census:
            model(token, state)
    return census


def rows() -> list[tuple[str, HostCensus]]:
    """(label, census) for every row of the table."""
    out = []
    for name in ("transformer", "infinitevl"):
        paper = narrow(recipe(name, "paper"))
        out.append((f"{name}, paper layout ({len(paper.layers)} layers), narrow", ours(paper)))
    for name in list_recipes():
        out.append((f"{name}, tiny", ours(recipe(name, "tiny"))))
    try:
        paper = narrow(recipe("transformer", "paper"))
        out.append(("transformers Qwen2, paper layout, narrow", hf(hf_twin(Decoder(paper)), paper.vocab_size)))
        out.append(("transformers Qwen2, tiny", hf(hf_twin(Decoder(recipe("transformer", "tiny"))), 256)))
        hybrid = one_norm_eps(narrow(recipe("qwen3-next", "paper")))  # GDN + gated attention, 48 layers
        out.append(("qwen3-next decode, paper layout, narrow", ours(hybrid)))
        out.append(("transformers Qwen3-Next, paper layout, narrow", hf(hf_twin(Decoder(hybrid)), hybrid.vocab_size)))
    except ImportError as error:
        print(f"transformers rows left out: {error}")
    out.append(("stream frame, tiny infinitevl VLM, 224 px", frame_census()))
    out.append(("decode step, tiny infinitevl VLM (M-RoPE)", vlm_decode_census()))
    return out


def table(counted: list[tuple[str, HostCensus]]) -> str:
    """The markdown table: one row per step."""
    lines = ["| step | host syncs | aten calls |", "|---|---:|---:|"]
    lines += [f"| {label} | {c.syncs} | {c.calls:,} |" for label, c in counted]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--sites", action="store_true", help="print where each step syncs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counted = rows()
    if args.sites:
        for label, census in counted:
            if census.syncs:
                print(f"{label}: {census.report()}")
    text = table(counted)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
