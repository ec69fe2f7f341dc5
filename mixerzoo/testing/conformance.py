"""The conformance kit: the eight invariants of the recurrent-state protocol as property checks.

`certify(config)` draws shapes, chunk splits, pad patterns and seeds with hypothesis and
checks, for the mixer the config names:

1. reference equality   the configured backend equals backend="reference" on the same weights
2. chunk invariance     any split of a sequence, and T = 1 steps, equal one call
3. padding invariance   pads anywhere are no-ops; a padded batch equals each row run alone, and so
                        does its continuation without pads (rows of different lengths then)
4. fork independence    state.clone() branches never affect each other
5. round trip           a state saved and loaded continues bit-exactly
6. bounded memory       state.nbytes equals config.state_nbytes(n_tokens, batch_size)
7. gradients            backward through the backend equals backward through the reference
8. packing              documents packed in rows (forward_packed) equal each document run alone

Each failure is an AssertionError naming the invariant and the quantity that differs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from mixerzoo.mixers import Mixer, MixerConfig, MixerState
from mixerzoo.registry import build_mixer, mixer_config

# Relative tolerances by dtype. float64: the backends differ only in summation order
# (about 1e-15 per op), 1e-9 leaves room for long recurrences. float32: eps is 1.2e-7,
# chunked forms and T = 1 steps accumulate in different orders over up to a few hundred
# steps, so 1e-4 is several hundred eps yet far below any real bug (errors of order 1).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}
_MAX_LEN = 24


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where a check runs and how close two results must be."""

    dtype: torch.dtype
    device: torch.device = torch.device("cpu")
    tolerance: float | None = None  # None: TOLERANCES[dtype]

    @property
    def tol(self) -> float:
        """The relative tolerance of comparisons."""
        return TOLERANCES[self.dtype] if self.tolerance is None else self.tolerance


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: torch.dtype | float) -> None:
    """Every element finite and within `tolerance` (a float, or a dtype's entry in TOLERANCES) relative to
    itself, with an absolute floor of `tolerance` times the larger of 1 and expected's max-abs (rounding
    errors scale with a tensor's magnitude); the message names `what`."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {list(actual.shape)} != {list(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: non-finite values")
    tol = TOLERANCES[tolerance] if isinstance(tolerance, torch.dtype) else tolerance
    size = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * size, msg=lambda m: f"{what}: {m}",
                               check_dtype=False)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Same shape, every element finite, and max-abs error within tol of expected's max-abs."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {list(actual.shape)} != {list(expected.shape)}")
    if not torch.isfinite(expected).all():
        raise AssertionError(f"{what}: expected has non-finite values")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: non-finite values")
    error = (actual.double() - expected.double()).abs().max().item()
    size = expected.double().abs().max().item()
    if error > tol * max(size, 1e-30):
        raise AssertionError(f"{what}: max-abs error {error:.3e} > {tol:g} * max-abs {size:.3e}")


def assert_states_close(actual: MixerState, expected: MixerState, what: str, tolerance: torch.dtype | float) -> None:
    """Every tensor of two states equal within tolerance (integer tensors exactly)."""
    if type(actual) is not type(expected):
        raise AssertionError(f"{what}: state kinds differ: {type(actual).__name__} vs {type(expected).__name__}")
    for name, tensor in actual.tensors().items():
        other = expected.tensors()[name]
        if tensor.is_floating_point():
            assert_close(tensor, other, f"{what}, state field {name!r}", tolerance)
        elif not torch.equal(tensor, other):
            raise AssertionError(f"{what}, state field {name!r}: {tensor.tolist()} != {other.tolist()}")


def build_pair(
    config: MixerConfig, dtype: torch.dtype, seed: int, device: torch.device | str = "cpu"
) -> tuple[Mixer, Mixer]:
    """(mixer under its configured backend, the same weights under backend="reference"), on `device`.

    Every parameter of the default init is perturbed by noise, so that zero-initialised
    gates or biases cannot hide a bug.
    """
    torch.manual_seed(seed)
    mixer = build_mixer(config).to(dtype)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mixer = mixer.to(device)
    reference = build_mixer(config.model_copy(update={"backend": "reference"})).to(device=device, dtype=dtype)
    reference.load_state_dict(mixer.state_dict())
    return mixer, reference


def _special_lengths(config: MixerConfig) -> list[int]:
    """Lengths at and around the config's window / internal chunk size."""
    lengths = []
    for field in ("window", "chunk_size"):
        n = getattr(config, field, None)
        if isinstance(n, int):
            lengths += [n - 1, n, n + 1, 2 * n + 1]
    return [n for n in lengths if 1 <= n <= 4 * _MAX_LEN]


def _lengths(config: MixerConfig) -> st.SearchStrategy[int]:
    special = _special_lengths(config)
    plain = st.integers(1, _MAX_LEN)
    return st.one_of(plain, st.sampled_from(special)) if special else plain


def _splits(data: st.DataObject, length: int) -> list[tuple[int, int]]:
    """Random chunk boundaries [(start, end), ...] covering range(length)."""
    cuts = data.draw(st.sets(st.integers(1, max(1, length - 1)), max_size=5)) if length > 1 else set()
    bounds = [0, *sorted(cuts), length]
    return list(zip(bounds[:-1], bounds[1:]))


def _run_chunks(mixer, x, state, bounds, valid=None):
    """Run x chunk by chunk from `state`; returns (concatenated y, final state)."""
    ys = []
    for start, end in bounds:
        chunk_valid = None if valid is None else valid[:, start:end]
        y, state = mixer(x[:, start:end], state, valid=chunk_valid)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _draw_setup(config, setting, data):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    batch = data.draw(st.integers(1, 3), label="batch")
    mixer, reference = build_pair(config, setting.dtype, seed, setting.device)
    gen = torch.Generator().manual_seed(seed)

    def tokens(length: int) -> torch.Tensor:
        return torch.randn(batch, length, config.d_model, generator=gen, dtype=setting.dtype).to(setting.device)

    return mixer, reference, batch, tokens


def check_reference_equality(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 1: a prefix then a chunk, under the backend and under the reference."""
    mixer, reference, _, tokens = _draw_setup(config, setting, data)
    x = tokens(data.draw(_lengths(config), label="prefix") + data.draw(_lengths(config), label="chunk"))
    cut = data.draw(st.integers(1, x.shape[1]), label="cut")
    bounds = [(start, end) for start, end in ((0, cut), (cut, x.shape[1])) if end > start]
    with torch.no_grad():
        y_fast, s_fast = _run_chunks(mixer, x, None, bounds)
        y_ref, s_ref = _run_chunks(reference, x, None, bounds)
    assert_close(y_fast, y_ref, "reference equality: outputs", setting.tol)
    assert_states_close(s_fast, s_ref, "reference equality: final state", setting.tol)


def check_chunk_invariance(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 2: random splits and T = 1 steps equal one call, outputs and final state."""
    mixer, _, _, tokens = _draw_setup(config, setting, data)
    x = tokens(data.draw(_lengths(config), label="length"))
    length = x.shape[1]
    with torch.no_grad():
        y_one, s_one = mixer(x)
        y_split, s_split = _run_chunks(mixer, x, None, _splits(data, length))
        y_step, s_step = _run_chunks(mixer, x, None, [(t, t + 1) for t in range(length)])
    assert_close(y_split, y_one, "chunk invariance: outputs of a split run", setting.tol)
    assert_states_close(s_split, s_one, "chunk invariance: final state of a split run", setting.tol)
    assert_close(y_step, y_one, "chunk invariance: outputs of T = 1 steps", setting.tol)
    assert_states_close(s_step, s_one, "chunk invariance: final state of T = 1 steps", setting.tol)


def _pad_pattern(data: st.DataObject, n_valid: int, extra: int) -> torch.Tensor:
    """A bool row with n_valid True and `extra` False placed anywhere (left, middle, right)."""
    slots = data.draw(st.permutations([True] * n_valid + [False] * extra), label="pad pattern")
    if data.draw(st.booleans(), label="left pads first"):
        slots = sorted(slots)  # all pads on the left, as left-padded batches
    return torch.tensor(slots, dtype=torch.bool)


def check_padding_invariance(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 3: a batch with pads anywhere equals each row run alone; pad outputs are zero."""
    mixer, _, batch, tokens = _draw_setup(config, setting, data)
    lengths = [data.draw(st.integers(0, _MAX_LEN), label=f"row {b} length") for b in range(batch)]
    total = max(lengths) + data.draw(st.integers(1, 8), label="pads")
    valid = torch.stack([_pad_pattern(data, n, total - n) for n in lengths]).to(setting.device)  # [B, total]
    x = tokens(total)  # pads hold random garbage, which must not leak
    after = tokens(data.draw(_lengths(config), label="continuation"))  # then every row real (valid=None)
    with torch.no_grad():
        y, state = _run_chunks(mixer, x, None, _splits(data, total), valid)
        if not torch.equal(y[~valid], torch.zeros_like(y[~valid])):
            raise AssertionError("padding invariance: outputs at pad positions are not zero")
        y_after, _ = _run_chunks(mixer, after, state, _splits(data, after.shape[1]))
        for row, n in enumerate(lengths):
            alone_state = mixer.init_state(1, dtype=setting.dtype)
            if n:
                y_alone, alone_state = mixer(x[row : row + 1, valid[row]])
                assert_close(y[row, valid[row]], y_alone[0], f"padding invariance: outputs of row {row}", setting.tol)
            assert_states_close(state.select([row]), alone_state, f"padding invariance: state of row {row}",
                                setting.tol)
            y_alone_after, _ = _run_chunks(mixer, after[row : row + 1], alone_state, [(0, after.shape[1])])
            assert_close(y_after[row], y_alone_after[0], f"padding invariance: row {row} continued without pads",
                         setting.tol)


def check_fork_independence(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 4: advancing the original or its clone leaves the other as it was."""
    mixer, _, _, tokens = _draw_setup(config, setting, data)
    prefix, branch_a, branch_b = (tokens(data.draw(_lengths(config), label=n)) for n in ("prefix", "a", "b"))
    with torch.no_grad():
        _, state = mixer(prefix)
        fork = state.clone()
        snapshot = {k: t.clone() for k, t in fork.tensors().items()}
        mixer(branch_a, state)
        for name, tensor in fork.tensors().items():
            if not torch.equal(tensor, snapshot[name]):
                raise AssertionError(f"fork independence: advancing the original changed the fork's {name!r}")
        y_fork, _ = mixer(branch_b, fork)
        y_fresh, _ = mixer(torch.cat([prefix, branch_b], dim=1))
    assert_close(y_fork, y_fresh[:, prefix.shape[1] :], "fork independence: outputs of the continued fork", setting.tol)


def check_round_trip(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 5: save then load gives bit-identical tensors and a bit-identical continuation."""
    mixer, _, _, tokens = _draw_setup(config, setting, data)
    prefix, chunk = tokens(data.draw(_lengths(config), label="prefix")), tokens(data.draw(_lengths(config), label="chunk"))
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        _, state = mixer(prefix)
        path = Path(tmp) / "state.safetensors"
        state.save(path, mixer.config)
        loaded = mixer.load_state(path, device=setting.device)
        for name, tensor in state.tensors().items():
            if not torch.equal(loaded.tensors()[name], tensor) or loaded.tensors()[name].dtype != tensor.dtype:
                raise AssertionError(f"round trip: state field {name!r} changed through save / load")
        y_loaded, _ = mixer(chunk, loaded)
        y_kept, _ = mixer(chunk, state)
    if not torch.equal(y_loaded, y_kept):
        raise AssertionError("round trip: continuing a loaded state is not bit-identical")


def check_bounded_memory(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 6: state.nbytes equals the config's prediction before and after tokens."""
    mixer, _, batch, tokens = _draw_setup(config, setting, data)
    state = mixer.init_state(batch, dtype=setting.dtype)
    seen = 0
    if state.nbytes != config.state_nbytes(0, batch, dtype=setting.dtype):
        raise AssertionError(f"bounded memory: empty state has {state.nbytes} bytes, config predicts "
                             f"{config.state_nbytes(0, batch, dtype=setting.dtype)}")
    with torch.no_grad():
        for _ in range(data.draw(st.integers(1, 3), label="chunks")):
            n = data.draw(_lengths(config), label="chunk length")
            _, state = mixer(tokens(n), state)
            seen += n
            predicted = config.state_nbytes(seen, batch, dtype=setting.dtype)
            if state.nbytes != predicted:
                raise AssertionError(f"bounded memory: after {seen} tokens the state has {state.nbytes} bytes, "
                                     f"config predicts {predicted}")


def check_gradients(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 7: gradients of inputs and parameters through a prefix state and a chunk."""
    mixer, reference, _, tokens = _draw_setup(config, setting, data)
    prefix, chunk = tokens(data.draw(_lengths(config), label="prefix")), tokens(data.draw(_lengths(config), label="chunk"))
    weights = torch.randn(chunk.shape, dtype=setting.dtype, generator=torch.Generator().manual_seed(1))
    weights = weights.to(setting.device)
    grads = []
    for module in (mixer, reference):
        inputs = [prefix.clone().requires_grad_(), chunk.clone().requires_grad_()]
        _, state = module(inputs[0])
        y, _ = module(inputs[1], state)
        params = list(module.parameters())
        grads.append(torch.autograd.grad((y * weights).sum(), inputs + params, allow_unused=True))
    names = ["input prefix", "input chunk"] + [n for n, _ in mixer.named_parameters()]
    for name, fast, ref in zip(names, *grads):
        if (fast is None) != (ref is None):
            raise AssertionError(f"gradients: {name} has a gradient under one backend only")
        if fast is not None:
            assert_close(fast, ref, f"gradients: d loss / d {name}", setting.tol)


def check_packing(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 8: rows packing several documents (and trailing pads) equal each document alone."""
    mixer, _, batch, tokens = _draw_setup(config, setting, data)
    lengths = _special_lengths(config) + list(range(1, _MAX_LEN + 1))
    rows = [data.draw(st.lists(st.sampled_from(lengths), min_size=0, max_size=4), label=f"row {b} documents")
            for b in range(batch)]
    total = max([sum(docs) for docs in rows] + [1]) + data.draw(st.integers(0, 3), label="pads")
    documents = torch.full((batch, total), -1)
    for b, docs in enumerate(rows):
        ends = torch.tensor(docs).cumsum(0).tolist()
        for d, (start, end) in enumerate(zip([0, *ends], ends)):
            documents[b, start:end] = d
    documents = documents.to(setting.device)
    x = tokens(total)  # pads hold random garbage, which must not leak
    with torch.no_grad():
        y = mixer.forward_packed(x, documents)
        if not torch.equal(y[documents < 0], torch.zeros_like(y[documents < 0])):
            raise AssertionError("packing: outputs at pad positions are not zero")
        for b, docs in enumerate(rows):
            for d in range(len(docs)):
                here = documents[b] == d
                alone, _ = mixer(x[b : b + 1, here])
                assert_close(y[b, here], alone[0], f"packing: row {b} document {d} (length {docs[d]})", setting.tol)


_NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def check_non_finite_containment(config: MixerConfig, setting: Setting, data: st.DataObject) -> None:
    """Invariant 9: a pad is a no-op whatever it holds (NaN and inf included), and outputs before t never
    depend on the input at t, even a non-finite one: earlier outputs and the other rows are as in a
    clean run, the row's outputs from t on are NaN and its state shows it."""
    mixer, _, batch, tokens = _draw_setup(config, setting, data)
    prefix = tokens(data.draw(st.integers(0, _MAX_LEN), label="prefix"))
    length = data.draw(st.integers(2, _MAX_LEN), label="chunk")
    x = tokens(length)
    valid = torch.stack([_pad_pattern(data, n, length - n) for n in
                         [data.draw(st.integers(1, length - 1), label=f"row {b} real") for b in range(batch)]])
    valid = valid.to(setting.device)  # [B, T], every row with a pad and a real token
    dirty = x.clone()
    for b, t in (~valid).nonzero().tolist():  # pads hold non-finite values in some channels
        channels = data.draw(st.sets(st.integers(0, config.d_model - 1), min_size=1, max_size=3), label="channels")
        dirty[b, t, sorted(channels)] = data.draw(_NON_FINITE, label="pad value")
    with torch.no_grad():
        state = mixer(prefix)[1] if prefix.shape[1] else None
        fork = None if state is None else state.clone()
        y_clean, s_clean = mixer(x, state, valid=valid)
        y_dirty, s_dirty = mixer(dirty, fork, valid=valid)
    assert_close(y_dirty, y_clean, "non-finite containment: outputs with non-finite pads", setting.tol)
    assert_states_close(s_dirty, s_clean, "non-finite containment: state after non-finite pads", setting.tol)

    row = data.draw(st.integers(0, batch - 1), label="poisoned row")
    t = data.draw(st.sampled_from(valid[row].nonzero().flatten().tolist()), label="poisoned token")
    poisoned = x.clone()
    poisoned[row, t, data.draw(st.integers(0, config.d_model - 1), label="channel")] = data.draw(_NON_FINITE)
    with torch.no_grad():
        state = mixer(prefix)[1] if prefix.shape[1] else None
        y_bad, s_bad = mixer(poisoned, state, valid=valid)
    assert_close(y_bad[:, :t], y_clean[:, :t], f"non-finite containment: outputs before the non-finite token "
                 f"(row {row}, t = {t})", setting.tol)
    others = [b for b in range(batch) if b != row]
    if others:
        assert_close(y_bad[others], y_clean[others], "non-finite containment: rows without a non-finite token",
                     setting.tol)
        assert_states_close(s_bad.select(others), s_clean.select(others),
                            "non-finite containment: states of rows without a non-finite token", setting.tol)
    if not y_bad[row, t:][valid[row, t:]].isnan().all():
        raise AssertionError(f"non-finite containment: row {row}'s outputs from its non-finite token (t = {t}) on "
                             f"are not all NaN")
    marked = [tensor for tensor in s_bad.select([row]).tensors().values() if tensor.is_floating_point()]
    if marked and not any((~torch.isfinite(tensor)).any() for tensor in marked):
        raise AssertionError(f"non-finite containment: row {row}'s state shows no trace of its non-finite token")


CHECKS: dict[str, Callable[[MixerConfig, Setting, st.DataObject], None]] = {
    "reference_equality": check_reference_equality,
    "chunk_invariance": check_chunk_invariance,
    "padding_invariance": check_padding_invariance,
    "fork_independence": check_fork_independence,
    "round_trip": check_round_trip,
    "bounded_memory": check_bounded_memory,
    "gradients": check_gradients,
    "packing": check_packing,
    "non_finite_containment": check_non_finite_containment,
}


# certify's own hypothesis settings, whatever profile is loaded: the same examples in a script, a notebook
# and pytest (derandomized), no deadline (a first call may compile or allocate), bounded examples.
CERTIFY_SETTINGS = hypothesis_settings(
    derandomize=True, max_examples=12, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def certify(
    config: Mapping[str, Any] | MixerConfig,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    tolerance: float | None = None,
    checks: tuple[str, ...] = tuple(CHECKS),
    settings: hypothesis_settings | None = None,
) -> None:
    """Check every invariant for the mixer `config` names; raises AssertionError on the first failure.

    Runs in `dtype` on `device`; `tolerance` (relative) defaults to TOLERANCES[dtype], which suits
    exact float32 arithmetic: a backend with lower-precision internals (fla's kernels take float32
    dot products in TF32) states its own. `settings` defaults to `CERTIFY_SETTINGS` (derandomized, 12
    examples per check, no deadline): the same call passes or fails the same way anywhere; pass e.g.
    `hypothesis.settings(CERTIFY_SETTINGS, max_examples=200)` for a deeper search.
    """
    config = mixer_config(config)
    if dtype not in TOLERANCES:
        raise ValueError(f"certify: dtype must be one of {list(TOLERANCES)}, got {dtype}")
    if tolerance is not None and not 0 < tolerance < 1:
        raise ValueError(f"certify: tolerance must be in (0, 1), got {tolerance}")
    setting = Setting(dtype, torch.device(device), tolerance)
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"certify: unknown checks {sorted(unknown)}; known: {list(CHECKS)}")
    for name in checks:
        check = CHECKS[name]

        @given(data=st.data())
        def prop(data: st.DataObject) -> None:
            check(config, setting, data)

        # one minimal failing example per check, raised as a plain AssertionError
        prop = hypothesis_settings(settings or CERTIFY_SETTINGS, report_multiple_bugs=False)(prop)
        prop()
