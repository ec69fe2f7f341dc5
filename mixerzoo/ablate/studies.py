"""Ablation studies: what one run of an experiment measures, registered by name.

A study is a function `study(run, scratch_dir) -> rows`: given a `RunConfig` (recipe, size,
seed, window / ratio overrides, study-specific `settings`) and a scratch directory it may
write to (deleted after the run), it returns one or more result rows, each a flat dict of
str / int / float / bool / None. The runner (`mixerzoo.ablate.runner`) adds the run's fields
and its `run_key` to every row, stores them, and skips runs whose key already has rows.

Writing a study::

    from mixerzoo.ablate.studies import RunConfig, build_spec, register_study

    @register_study("my-study")                      # optional: plot=fn(rows, path)
    def my_study(run: RunConfig, scratch: Path) -> list[dict]:
        spec = build_spec(run)                        # recipe at size, overrides applied
        n = run.settings.get("steps", 100)            # study settings, with defaults
        scale = run.settings.get("scale", 1.0)        # the experiment's scale factor
        return [{"loss": ...}]

Studies in `mixerzoo.ablate` modules listed in `_BUILTIN_MODULES` (such as `mqar_study`)
register themselves when first looked up; a study defined elsewhere registers when its
module is imported. Built in here: `efficiency` (decode latency, prefill throughput,
state bytes, parameters and FLOPs per token against context).

Plots: a study may register its own plot (`register_study(name, plot=fn)`); named plots
(`register_plot(name)`) can be chosen by any experiment with `plot: <name>`. Built in
here: `frontier` (accuracy against state bytes, zoology's recall-memory frontier).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from mixerzoo.blocks import Decoder, LayoutSpec, flops_per_token, parameter_count, random_state, state_nbytes
from mixerzoo.registry import recipe

Row = dict[str, Any]
Study = Callable[["RunConfig", Path], list[Row]]
PlotHook = Callable[[list[Row], Path], None]


def save_figure(fig, path: Path) -> None:
    """Lay out a matplotlib figure, write it to `path` as a 110-dpi PNG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)

_STUDIES: dict[str, Study] = {}
_PLOTS: dict[str, PlotHook] = {}
_NAMED_PLOTS: dict[str, PlotHook] = {}
_BUILTIN_MODULES = ("mixerzoo.ablate.mqar_study", "mixerzoo.ablate.visual_study", "mixerzoo.ablate.stream_study",
                    "mixerzoo.ablate.lm_study")


class RunConfig(BaseModel):
    """One run of a study: a recipe at a size and seed, optional overrides, study settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study: str
    recipe: str
    size: str = "tiny"
    seed: int = 0
    window: int | None = Field(None, ge=1, description="window of every sliding-window attention layer, if set")
    ratio: str | None = Field(None, pattern=r"^\d+:\d+$",
                              description="'A:G' attention : Gated DeltaNet layer ratio, if set")
    n_layers: int | None = Field(None, ge=1, description="depth: the recipe's layer list repeated or cut to this many")
    d_model: int | None = Field(None, ge=1, description="width: head counts and MLP width scaled with it, head sizes kept")
    settings: dict[str, Any] = Field(default_factory=dict, description="study-specific settings")

    def key(self) -> str:
        """A stable short hash of the run's canonical JSON: identifies the run for resuming."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def register_study(name: str, *, plot: PlotHook | None = None) -> Callable[[Study], Study]:
    """Decorator registering `study(run, scratch_dir) -> rows` under `name`, with an optional
    `plot(rows, path)` hook that draws the experiment's rows to a PNG at `path`."""

    def decorate(study: Study) -> Study:
        if name in _STUDIES:
            raise ValueError(f"study {name!r} is already registered")
        _STUDIES[name] = study
        if plot is not None:
            _PLOTS[name] = plot
        return study

    return decorate


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def list_studies() -> list[str]:
    """Registered study names."""
    _load_builtin()
    return sorted(_STUDIES)


def get_study(name: str) -> Study:
    """The study registered as `name`; KeyError listing the registered studies otherwise."""
    _load_builtin()
    if name not in _STUDIES:
        raise KeyError(f"unknown study {name!r}; registered: {sorted(_STUDIES)}")
    return _STUDIES[name]


def register_plot(name: str) -> Callable[[PlotHook], PlotHook]:
    """Decorator registering `plot(rows, path)` (draws rows to a PNG at `path`) under `name`,
    for experiments to choose with `plot: <name>`."""

    def decorate(plot: PlotHook) -> PlotHook:
        if name in _NAMED_PLOTS:
            raise ValueError(f"plot {name!r} is already registered")
        _NAMED_PLOTS[name] = plot
        return plot

    return decorate


def list_plots() -> list[str]:
    """Registered plot names (those an experiment's `plot:` may name)."""
    _load_builtin()
    return sorted(_NAMED_PLOTS)


def get_plot(study: str, plot: str | None = None) -> PlotHook | None:
    """The registered plot named `plot` if given (KeyError listing the registered plots if
    unknown), else the plot hook registered with `study`, else None."""
    _load_builtin()
    if plot is None:
        return _PLOTS.get(study)
    if plot not in _NAMED_PLOTS:
        raise KeyError(f"unknown plot {plot!r}; registered plots: {sorted(_NAMED_PLOTS)}")
    return _NAMED_PLOTS[plot]


def build_spec(run: RunConfig) -> LayoutSpec:
    """The spec of `run.recipe` at `run.size`, with the run's overrides applied.

    `n_layers` repeats or cuts the recipe's layer list to that depth (infinitevl's SGGG at 2
    layers is SG). `d_model` scales the width: every head count (n_heads, n_kv_heads) and the
    MLP's hidden width by d_model / the recipe's, head sizes and state sizes per head kept (a
    width that leaves a fractional head count is an error).
    `ratio` 'A:G' rebuilds the layer list with A attention layers per G Gated DeltaNet
    layers spread evenly over the same depth (the recipe's own attention and Gated
    DeltaNet layers are the templates; a recipe lacking one whose weight is positive is
    an error). '0:1' is all Gated DeltaNet and '1:0' all attention. `window` then sets
    the window of every sliding-window attention layer (full-attention layers stay full;
    a spec without sliding-window layers is unchanged).
    """
    spec = recipe(run.recipe, run.size)
    if run.n_layers is not None:
        spec = _with_depth(spec, run.n_layers)
    if run.d_model is not None:
        spec = _with_width(spec, run.d_model)
    if run.ratio is not None:
        spec = _with_ratio(spec, run.recipe, run.ratio)
    if run.window is not None:
        data = spec.model_dump(mode="json")
        for layer in data["layers"]:
            if layer["mixer"]["type"] == "attention" and layer["mixer"].get("window") is not None:
                layer["mixer"]["window"] = run.window
        spec = LayoutSpec.model_validate(data)
    return spec


def _with_depth(spec: LayoutSpec, n_layers: int) -> LayoutSpec:
    data = spec.model_dump(mode="json")
    data["layers"] = [data["layers"][i % spec.n_layers] for i in range(n_layers)]
    return LayoutSpec.model_validate(data)


def _with_width(spec: LayoutSpec, d_model: int) -> LayoutSpec:
    data = spec.model_dump(mode="json")

    def scaled(what: str, value: int) -> int:
        if (value * d_model) % spec.d_model:
            raise ValueError(f"d_model {d_model}: {what} = {value} x {d_model} / {spec.d_model} is not a whole number")
        return value * d_model // spec.d_model

    data["d_model"] = d_model
    for layer in data["layers"]:
        layer["mixer"]["d_model"] = d_model
        for field in ("n_heads", "n_kv_heads"):
            if layer["mixer"].get(field) is not None:
                layer["mixer"][field] = scaled(f"mixer.{field}", layer["mixer"][field])
        if layer["mlp"].get("hidden") is not None:
            layer["mlp"]["hidden"] = scaled("mlp.hidden", layer["mlp"]["hidden"])
    return LayoutSpec.model_validate(data)


def _with_ratio(spec: LayoutSpec, name: str, ratio: str) -> LayoutSpec:
    templates = {}
    for layer in spec.layers:
        letter = {"attention": "A", "gated_deltanet": "G"}.get(layer.mixer.type)
        if letter:
            templates.setdefault(letter, layer.model_dump(mode="json"))
    attention, gdn = (int(part) for part in ratio.split(":"))
    # letters with a positive weight; G before A, so a tie puts attention first
    weights = {letter: weight for letter, weight in (("G", gdn), ("A", attention)) if weight}
    if not weights:
        raise ValueError(f"ratio {ratio!r}: at least one weight must be positive")
    for letter, kind in (("A", "attention"), ("G", "Gated DeltaNet")):
        if letter in weights and letter not in templates:
            raise ValueError(f"ratio {ratio!r}: recipe {name!r} has no {kind} layer to use as a template")
    data = spec.model_dump(mode="json", exclude={"layers"})
    data.update(n_layers=spec.n_layers, ratio=weights, mlp=templates[next(iter(weights))]["mlp"],
                legend={letter: templates[letter]["mixer"] for letter in weights})
    return LayoutSpec.model_validate(data)


# ---------------------------------------------------------------- frontier plot


@register_plot("frontier")
def frontier_plot(rows: list[Row], path: Path) -> None:
    """Zoology's recall-memory frontier to PNG `path`: accuracy (mean over seeds, ± std as error
    bars) against state bytes (log scale), one marker series per SWA:GDN ratio (per recipe for
    runs without a ratio), each point labelled by its sliding window (`swa_window` column, else
    the run's `window`) and width (`d_model`, when set); one panel per `seq_len` when the rows
    hold several; a dotted line at chance when the rows give `chance`. Rows need numeric
    `state_bytes` and `accuracy` columns (ValueError naming the first row without them)."""
    for number, row in enumerate(rows, 1):
        if not all(isinstance(row.get(c), (int, float)) for c in ("state_bytes", "accuracy")):
            raise ValueError(f"frontier plot: row {number} (recipe {row.get('recipe')!r}) lacks a numeric "
                             f"'state_bytes' or 'accuracy' column; the frontier needs both")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixerzoo.ablate.summary import over_seeds

    points = over_seeds([{**row, "accuracy": float(row["accuracy"])} for row in rows])
    panels = sorted({row.get("seq_len") for row in points}, key=str)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        series: dict[str, list[Row]] = {}
        for row in points:
            if row.get("seq_len") == panel:
                name = f"SWA:GDN {row['ratio']}" if row.get("ratio") is not None else str(row.get("recipe"))
                series.setdefault(name, []).append(row)
        for (name, mine), marker in zip(series.items(), itertools.cycle("osD^vP*X")):
            seeds = max(r["seeds"] for r in mine)
            ax.errorbar([r["state_bytes"] for r in mine], [r["accuracy"] for r in mine],
                        yerr=[r["accuracy_std"] for r in mine], fmt=marker, capsize=3, markersize=6,
                        label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})")
            for r in mine:
                window, width = r.get("swa_window", r.get("window")), r.get("d_model")
                text = " ".join(t for t in (window is not None and f"w={window}", width and f"d={width}") if t)
                if text:
                    ax.annotate(text, (r["state_bytes"], r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
        chance = {r.get("chance") for r in points if r.get("seq_len") == panel} - {None}
        if len(chance) == 1:
            ax.axhline(chance.pop(), color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("state bytes at the sequence length (log)" if panel is None
                      else f"state bytes at seq_len {panel} (log)")
        ax.set_title("Recall against state size" if panel is None else f"Recall against state size, seq_len {panel}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy (mean ± std over seeds)")
    save_figure(fig, path)


# ---------------------------------------------------------------- efficiency study

_EFFICIENCY_SETTINGS = {"contexts", "repeats", "prefill_tokens", "threads", "scale"}


@register_study("efficiency")
def efficiency(run: RunConfig, scratch: Path) -> list[Row]:
    """Per context: decode latency, prefill throughput, state bytes (measured and predicted),
    parameters and FLOPs per token of the run's Decoder (float32, batch 1, inference mode).

    Settings: `contexts` (default [1024, 4096, 16384]), `repeats` (decode steps timed, the
    median reported; default 5), `prefill_tokens` (one prefill call from an empty state;
    default 512), `threads` (torch intra-op threads while measuring; default 1). Decode starts from a state filled with random values of the size
    `context` tokens leave, not from a prefill (`state_fill="random"` in every row).
    """
    unknown = sorted(run.settings.keys() - _EFFICIENCY_SETTINGS)
    if unknown:
        raise ValueError(f"efficiency: unknown settings {unknown}; known: {sorted(_EFFICIENCY_SETTINGS)}")
    contexts = [int(c) for c in run.settings.get("contexts", [1024, 4096, 16384])]
    repeats = int(run.settings.get("repeats", 5))
    prefill_tokens = int(run.settings.get("prefill_tokens", 512))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(run.settings.get("threads", 1)))
    try:
        return _efficiency(run, contexts, repeats, prefill_tokens)
    finally:
        torch.set_num_threads(threads_before)


def _efficiency(run: RunConfig, contexts: list[int], repeats: int, prefill_tokens: int) -> list[Row]:
    torch.manual_seed(run.seed)
    spec = build_spec(run)
    model = Decoder(spec).eval()
    parameters, rows = parameter_count(spec), []
    with torch.inference_mode():
        prompt = torch.randint(spec.vocab_size, (1, prefill_tokens))
        model(prompt[:, :8])  # warm-up
        start = time.perf_counter()
        model(prompt)
        prefill_s = time.perf_counter() - start
        for context in contexts:
            state = random_state(model, context)
            token = torch.randint(spec.vocab_size, (1, 1))
            model(token, state)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(token, state)
                times.append(time.perf_counter() - start)
            rows.append(dict(
                context=context, decode_latency_ms=statistics.median(times) * 1e3, decode_repeats=repeats,
                state_fill="random", prefill_tokens=prefill_tokens, prefill_tokens_per_s=prefill_tokens / prefill_s,
                state_nbytes=state.nbytes, predicted_state_nbytes=state_nbytes(spec, context, dtype=torch.float32),
                parameters=parameters, flops_per_token=flops_per_token(spec, context), threads=torch.get_num_threads(),
            ))
            del state
    return rows


__all__ = ["PlotHook", "Row", "RunConfig", "Study", "build_spec", "frontier_plot", "get_plot", "get_study",
           "list_plots", "list_studies", "register_plot", "register_study"]
