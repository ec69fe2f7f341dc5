"""The benchmark cases: mixerzoo against the pure-PyTorch paths a user would pick instead.

Each group is one row of the comparison (one shape, one kind of call); its contenders run the
same inputs. `Group.setup(scale)` builds every contender whose package is installed and returns
a closure per contender plus an agreement check, which the suite runs before timing anything.
Decode closures advance their own state one token per call (as a generation loop does), so
every contender, timed over the same number of calls, ends at the same context.

Peers: transformers (Qwen2ForCausalLM, Qwen3NextForCausalLM and Qwen3-Next's torch gated delta
rule) and fla's naive pure-torch references. transformers routes Qwen3-Next's gated delta rule to
fla's Triton kernels whenever fla is installed, and those do not run on a CPU; the suite calls
transformers' own torch functions (`__wrapped__`), which is what transformers runs without fla.

Scales: "full" is what docs/PERFORMANCE.md reports; "tiny" runs every case in seconds (the smoke test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import tempfile
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from mixerzoo.blocks import Decoder, random_state
from mixerzoo.ops import dplr_delta_rule, gated_delta_rule, gated_linear_attention, ssd
from mixerzoo.registry import recipe
from mixerzoo.registry.recipes import layout
from mixerzoo.testing import assert_rel_close

MIXERZOO, TRANSFORMERS, FLA, FLOOR = "mixerzoo", "transformers", "fla naive", "matmul floor"
PEER_MODULES = {TRANSFORMERS: "transformers", FLA: "fla"}
# Relative agreement asserted before timing (max-abs error / max-abs of mixerzoo's output):
# float32 paths that sum in different orders over at most a few thousand terms.
AGREEMENT = 1e-4


def without_grad(fns: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """Each contender called under torch.no_grad (a forward-only row)."""

    def wrap(fn):
        def call():
            with torch.no_grad():
                return fn()

        return call

    return {name: wrap(fn) for name, fn in fns.items()}


def peer_missing(contender: str) -> str | None:
    """Why `contender` cannot run here (its package is not installed), or None."""
    module = PEER_MODULES.get(contender)
    if module and importlib.util.find_spec(module) is None:
        return f"{contender}: the package {module!r} is not installed"
    return None


@dataclasses.dataclass(frozen=True)
class Group:
    """One row: its name, contenders, how many timed calls each gets, and how to set it up."""

    name: str
    contenders: tuple[str, ...]
    setup: Callable[[str], tuple[dict[str, Callable[[], object]], Callable[[], None]]]
    rounds: int = 20
    warmup: int = 3


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same shape, all finite, max-abs error within AGREEMENT of expected's max-abs."""
    assert_rel_close(actual, expected, AGREEMENT, what)


# ---------------------------------------------------------------------------------------------
# Transformers models with mixerzoo's weights


@contextlib.contextmanager
def hf_torch_paths() -> Iterator[None]:
    """Qwen3-Next's gated delta rule through transformers' own torch functions (see the module doc)."""
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    names = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
    saved = {n: getattr(m, n) for n in names}
    for n in names:
        setattr(m, n, getattr(saved[n], "__wrapped__", saved[n]))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(m, n, f)


def hf_torch_gdn(kind: str) -> Callable:
    """transformers' torch_{kind}_gated_delta_rule of Qwen3-Next (kind: chunk or recurrent)."""
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    f = getattr(m, f"torch_{kind}_gated_delta_rule")
    return getattr(f, "__wrapped__", f)


def one_norm_eps(spec):
    """`spec` with every mixer's norm epsilon the model's (Qwen3-Next's config has one rms_norm_eps for all)."""
    data = spec.model_dump(mode="json")
    for layer in data["layers"]:
        layer["mixer"]["norm_eps"] = data["norm_eps"]
    return type(spec).model_validate(data)


def hf_twin(model: Decoder):
    """The transformers model of `model`'s family holding its weights: written by `save_pretrained`
    (mixerzoo.blocks.hub, the loader's own mapping) and read by transformers' class of its family."""
    import transformers

    from mixerzoo.blocks.hub import FAMILIES

    with tempfile.TemporaryDirectory() as folder:
        family = model.save_pretrained(folder)
        if family == "mixerzoo":
            raise ValueError("hf_twin: this layout has no transformers family (it saves in mixerzoo's own format)")
        # transformers' own class, not the Auto mapping (importing fla re-registers some model types there)
        return getattr(transformers, FAMILIES[family].architecture).from_pretrained(folder, attn_implementation="sdpa").eval()


# ---------------------------------------------------------------------------------------------
# Whole-model decode


def _advancing(step: Callable[[object], tuple[torch.Tensor, object]], state: object) -> Callable[[], torch.Tensor]:
    """A closure running one decode step from the current state and keeping the new one."""
    box = [state]

    def call() -> torch.Tensor:
        with torch.inference_mode():
            logits, box[0] = step(box[0])
        return logits

    return call


def _hf_step(model, ids: torch.Tensor):
    def step(cache):
        out = model(input_ids=ids, cache=cache, use_cache=True)
        return out.logits, out.past_key_values

    return step


def _ours_step(model: Decoder, ids: torch.Tensor):
    return lambda state: model(ids, state)


def qwen2_decode(scale: str):
    """Full-attention decode after a long context: mixerzoo `transformer` vs its Qwen2 twin, from
    the same random keys and values (a prefill of this length would take minutes on 2 cores)."""
    size, context = ("small", 8192) if scale == "full" else ("tiny", 64)
    torch.manual_seed(0)
    model = Decoder(recipe("transformer", size)).eval()
    state = random_state(model, context)
    ids = torch.randint(model.spec.vocab_size, (1, 1))
    fns = {MIXERZOO: _advancing(_ours_step(model, ids), state)}
    if peer_missing(TRANSFORMERS) is None:
        from transformers import DynamicCache

        twin = hf_twin(model)
        cache = DynamicCache(config=twin.config)
        for i, layer in enumerate(state.layers):
            cache.update(layer.k.clone(), layer.v.clone(), i)
        fns[TRANSFORMERS] = _advancing(_hf_step(twin, ids), cache)

    def check() -> None:
        if TRANSFORMERS in fns:
            assert_agree(fns[TRANSFORMERS](), fns[MIXERZOO](), "qwen2 decode logits")

    return fns, check


def hybrid_decode(scale: str):
    """Hybrid decode (GGGA: three Gated DeltaNet layers to one gated attention, Qwen3-Next's layer kinds) after
    a prefill, mixerzoo vs its Qwen3-Next twin (the same weights, through the loader's mapping)."""
    size, context = ("small", 1024) if scale == "full" else ("tiny", 32)
    torch.manual_seed(0)
    model = Decoder(one_norm_eps(layout(size, pattern="GGGA"))).eval()
    prompt = torch.randint(model.spec.vocab_size, (1, context))
    ids = torch.randint(model.spec.vocab_size, (1, 1))
    with torch.inference_mode():
        _, state = model(prompt)
    fns = {MIXERZOO: _advancing(_ours_step(model, ids), state)}
    if peer_missing(TRANSFORMERS) is None:
        twin = hf_twin(model)
        with hf_torch_paths(), torch.inference_mode():
            cache = twin(input_ids=prompt, use_cache=True).past_key_values
        hf_step = _hf_step(twin, ids)

        def step(cache):
            with hf_torch_paths():
                return hf_step(cache)

        fns[TRANSFORMERS] = _advancing(step, cache)

    def check() -> None:
        if TRANSFORMERS in fns:
            assert_agree(fns[TRANSFORMERS](), fns[MIXERZOO](), "qwen3-next decode logits")

    return fns, check


def decode_vs_context(scale: str):
    """Decode latency of four recipes at a short and a long context, each from a random state of
    that context's size (not a prefill), after checking state.nbytes against the configs' formula;
    the contenders are "recipe @ short" and "recipe @ long"."""
    size = "small" if scale == "full" else "tiny"
    fns = {}
    for name in RECIPES_VS_CONTEXT:
        torch.manual_seed(0)
        model = Decoder(recipe(name, size)).eval()
        for role, context in CONTEXTS[scale].items():
            state = random_state(model, context)
            expected = sum(layer.mixer.state_nbytes(context) for layer in model.spec.layers) + state.seen.nbytes
            if state.nbytes != expected:
                raise AssertionError(f"{name} @ {context}: state.nbytes {state.nbytes} != config formula {expected}")
            fns[f"{name} @ {role}"] = _advancing(_ours_step(model, torch.tensor([[1]])), state)
    return fns, lambda: None


# The contexts of decode_vs_context per scale (docs/PERFORMANCE.md: 1K and 64K).
CONTEXTS = {"full": {"short": 1024, "long": 65536}, "tiny": {"short": 16, "long": 128}}
RECIPES_VS_CONTEXT = ("transformer", "infinitevl", "gdn", "swa")


def context_label(context: int) -> str:
    """1024 -> '1K'; other numbers as they are."""
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


# ---------------------------------------------------------------------------------------------
# Ops


def gdn_inputs(seq_len: int, heads: int, dim_k: int, dim_v: int, *, grad: bool = False, seed: int = 0) -> dict:
    """Gated delta rule inputs as the mixer makes them (unit-norm q and k), with a random initial state."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "q": F.normalize(torch.randn(1, seq_len, heads, dim_k, generator=gen), dim=-1),
        "k": F.normalize(torch.randn(1, seq_len, heads, dim_k, generator=gen), dim=-1),
        "v": torch.randn(1, seq_len, heads, dim_v, generator=gen),
        "g": F.logsigmoid(torch.randn(1, seq_len, heads, generator=gen) + 3),
        "beta": torch.rand(1, seq_len, heads, generator=gen),
        "initial_state": 0.1 * torch.randn(1, heads, dim_k, dim_v, generator=gen),
    }
    return {k: t.requires_grad_(grad) for k, t in inputs.items()}


def _gdn_contenders(kind: str) -> dict[str, Callable]:
    """(q, k, v, g, beta, initial_state) -> (o, final state) for each contender; kind chunk or recurrent."""
    def ours(q, k, v, g, beta, initial_state):
        return gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, backend="torch")

    fns = {MIXERZOO: ours}
    if peer_missing(TRANSFORMERS) is None:
        hf = hf_torch_gdn(kind)
        fns[TRANSFORMERS] = lambda q, k, v, g, beta, initial_state: hf(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True
        )
    if peer_missing(FLA) is None:
        from fla.ops.gated_delta_rule import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

        naive = naive_chunk_gated_delta_rule if kind == "chunk" else naive_recurrent_gated_delta_rule
        fns[FLA] = lambda q, k, v, g, beta, initial_state: naive(
            q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, output_final_state=True
        )
    return fns


def gdn_op(seq_len: int, heads: int, dim_k: int, dim_v: int, *, backward: bool):
    """A setup timing one gated_delta_rule call (and its backward) at the given shape."""

    def setup(scale: str):
        t = seq_len if scale == "full" else 48
        kind = "recurrent" if t == 1 else "chunk"
        inputs = gdn_inputs(t, heads, dim_k, dim_v, grad=backward)
        cotangent = torch.randn(1, t, heads, dim_v, generator=torch.Generator().manual_seed(2))

        def timed(fn):
            def call():
                if not backward:
                    with torch.no_grad():
                        return fn(**inputs)
                for leaf in inputs.values():
                    leaf.grad = None
                o, state = fn(**inputs)
                ((o * cotangent).sum() + state.sum()).backward()
                return (o.detach(), state.detach(), *(leaf.grad for leaf in inputs.values()))

            return call

        fns = {name: timed(fn) for name, fn in _gdn_contenders(kind).items()}

        def check() -> None:
            expected = fns[MIXERZOO]()
            for name, fn in fns.items():
                for i, (a, e) in enumerate(zip(fn(), expected)):
                    assert_agree(a, e, f"{name} vs mixerzoo, output {i}")

        return fns, check

    return setup


def ssd_op(seq_len: int, heads: int, dim: int):
    """A setup timing one ssd call (Mamba2's scan) against fla's naive chunked simple GLA, forward."""

    def setup(scale: str):
        t = seq_len if scale == "full" else 48
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, t, heads, dim, generator=gen)
        dt = F.softplus(torch.randn(1, t, heads, generator=gen) - 2)
        A = -4 * torch.rand(heads, generator=gen)
        B = torch.randn(1, t, 1, dim, generator=gen) / dim**0.5
        C = torch.randn(1, t, 1, dim, generator=gen)
        state = 0.1 * torch.randn(1, heads, dim, dim, generator=gen)
        fns = {MIXERZOO: lambda: ssd(x, dt, A, B, C, initial_state=state, backend="torch")}
        if peer_missing(FLA) is None:
            from fla.ops.simple_gla.naive import naive_chunk_simple_gla

            def fla():
                y, s = naive_chunk_simple_gla(
                    q=C.expand(-1, -1, heads, -1), k=B.expand(-1, -1, heads, -1), v=x * dt[..., None], g=A * dt,
                    initial_state=state.transpose(-1, -2), output_final_state=True, scale=1.0,
                )
                return y, s.transpose(-1, -2)

            fns[FLA] = fla

        def check() -> None:
            with torch.no_grad():
                expected = fns[MIXERZOO]()
                for name, fn in fns.items():
                    for i, (a, e) in enumerate(zip(fn(), expected)):
                        assert_agree(a, e, f"{name} vs mixerzoo ssd, output {i}")

        return without_grad(fns), check

    return setup


def matmul_floor(batch_heads: int, seq_len: int, dim_k: int, dim_v: int, chunk: int = 64) -> Callable[[], object]:
    """The four products any chunked linear recurrence needs per chunk and head (q k^T, scores v, q S, k^T v),
    batched over every chunk at once: the floor a chunked op cannot go below on this core."""
    gen = torch.Generator().manual_seed(0)
    n = batch_heads * -(-seq_len // chunk)
    q, k = torch.randn(n, chunk, dim_k, generator=gen), torch.randn(n, chunk, dim_k, generator=gen)
    v, state = torch.randn(n, chunk, dim_v, generator=gen), torch.randn(n, dim_k, dim_v, generator=gen)
    return lambda: (q @ k.mT @ v, q @ state, k.mT @ v)


ZOO_FAMILIES = ("linear attention", "scalar decay", "per-channel decay", "delta rule", "per-channel delta rule", "DPLR")


def zoo_op(family: str, seq_len: int, heads: int, dim: int):
    """A setup timing one forward of the zoo's op for `family` against fla's naive chunked function of the
    same family (where fla has one) and the matmul floor; agreement on the outputs is checked first."""

    def setup(scale: str):
        t = seq_len if scale == "full" else 128
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, t, heads, dim, generator=gen)
        k = F.normalize(torch.randn(1, t, heads, dim, generator=gen), dim=-1)
        v = torch.randn(1, t, heads, dim, generator=gen)
        g = -torch.rand(1, t, heads, generator=gen) * 0.1
        gk = -torch.rand(1, t, heads, dim, generator=gen) * 0.1
        beta = torch.rand(1, t, heads, generator=gen)
        removal = F.normalize(torch.randn(1, t, heads, dim, generator=gen), dim=-1)  # RWKV-7's a = -kk, b = kk a_t
        a, b = -removal, removal * torch.rand(1, t, heads, dim, generator=gen)
        ours = {
            "linear attention": lambda: gated_linear_attention(q, k, v, backend="torch")[0],
            "scalar decay": lambda: gated_linear_attention(q, k, v, g, backend="torch")[0],
            "per-channel decay": lambda: gated_linear_attention(q, k, v, gk, backend="torch")[0],
            "delta rule": lambda: gated_delta_rule(q, k, v, None, beta, backend="torch")[0],
            "per-channel delta rule": lambda: gated_delta_rule(q, k, v, gk, beta, backend="torch")[0],
            "DPLR": lambda: dplr_delta_rule(q, k, v, a, b, gk, backend="torch")[0],
        }[family]
        fns = {MIXERZOO: ours, FLOOR: matmul_floor(heads, t, dim, dim)}
        if peer_missing(FLA) is None and family != "per-channel decay":  # fla has no naive chunked GLA
            from fla.ops.delta_rule.naive import delta_rule_chunkwise
            from fla.ops.generalized_delta_rule.dplr.naive import dplr_chunkwise
            from fla.ops.kda.naive import naive_chunk_kda
            from fla.ops.linear_attn.naive import naive_chunk_linear_attn
            from fla.ops.simple_gla.naive import naive_chunk_simple_gla

            head_first = [x.transpose(1, 2) for x in (q, k, v, beta)]
            dplr_inputs = [x.transpose(1, 2) for x in (q, k, v, a, b, gk)]
            fns[FLA] = {
                "linear attention": lambda: naive_chunk_linear_attn(q, k, v),
                "scalar decay": lambda: naive_chunk_simple_gla(q, k, v, g)[0],
                "delta rule": lambda: delta_rule_chunkwise(*head_first, chunk_size=64)[0].transpose(1, 2),
                "per-channel delta rule": lambda: naive_chunk_kda(q, k, v, gk, beta)[0],
                "DPLR": lambda: dplr_chunkwise(*dplr_inputs, chunk_size=32)[0].transpose(1, 2),
            }[family]

        def check() -> None:
            with torch.no_grad():
                expected = fns[MIXERZOO]()
                if FLA in fns:
                    assert_agree(fns[FLA](), expected, f"fla naive vs mixerzoo, {family}")

        return without_grad(fns), check

    return setup


PEERS = (MIXERZOO, TRANSFORMERS, FLA)
GROUPS: tuple[Group, ...] = (
    Group("full-attention decode @ 8K (Qwen2 shapes)", (MIXERZOO, TRANSFORMERS), qwen2_decode, rounds=30),
    Group("hybrid decode GGGA @ 1K (Qwen3-Next shapes)", (MIXERZOO, TRANSFORMERS), hybrid_decode, rounds=30),
    Group("GDN decode step K=V=64 (H=4)", PEERS, gdn_op(1, 4, 64, 64, backward=False), rounds=200, warmup=20),
    Group("GDN decode step K=128 V=256 (H=4)", PEERS, gdn_op(1, 4, 128, 256, backward=False), rounds=200, warmup=20),
    Group("GDN forward K=V=64 T=2048 (H=4)", PEERS, gdn_op(2048, 4, 64, 64, backward=False), rounds=5, warmup=1),
    Group("GDN forward K=128 V=256 T=2048 (H=4)", PEERS, gdn_op(2048, 4, 128, 256, backward=False), rounds=5, warmup=1),
    Group("GDN fwd+bwd K=V=64 T=2048 (H=4)", PEERS, gdn_op(2048, 4, 64, 64, backward=True), rounds=3, warmup=1),
    Group("GDN fwd+bwd K=128 V=256 T=2048 (H=4)", PEERS, gdn_op(2048, 4, 128, 256, backward=True), rounds=3, warmup=1),
    Group("SSD forward P=N=64 T=4096 (H=4)", (MIXERZOO, FLA), ssd_op(4096, 4, 64), rounds=5, warmup=1),
    *(Group(f"{family} forward K=V=64 T=4096 (H=4)", (MIXERZOO, FLA, FLOOR) if family != "per-channel decay"
            else (MIXERZOO, FLOOR), zoo_op(family, 4096, 4, 64), rounds=5, warmup=1) for family in ZOO_FAMILIES),
)
CONTEXT_GROUP = Group(
    "decode vs context (small recipes)",
    tuple(f"{name} @ {role}" for name in RECIPES_VS_CONTEXT for role in ("short", "long")),
    decode_vs_context, rounds=20, warmup=3,
)
