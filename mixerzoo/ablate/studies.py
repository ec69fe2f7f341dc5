"""Ablation studies: what one run of an experiment measures, registered by name.

A study is a function `study(run, scratch_dir) -> rows`: given a `RunConfig` (recipe, size,
seed, window / ratio overrides, study-specific `settings`) and a scratch directory it may
write to (deleted after the run), it returns one or more result rows, each a flat dict of
str / int / float / bool / None. The runner (`mixerzoo.ablate.runner`) adds the run's fields
and its `run_key` to every row, stores them, and skips runs whose key already has rows.

Writing a study::

    from mixerzoo.ablate.studies import RunConfig, StudySettings, TrainSteps, build_spec, register_study

    class MySettings(StudySettings):                  # extra="forbid": a misspelt key is an error
        steps: TrainSteps = 100                       # shared field types: TrainSteps, PeakLR, WarmupSteps, WeightDecay

    @register_study("my-study", settings=MySettings)  # optional: plot=fn(rows, path)
    def my_study(run: RunConfig, scratch: Path) -> list[dict]:
        settings = MySettings.model_validate(run.settings)
        spec = build_spec(run)                        # recipe at size, overrides applied
        steps = round(settings.steps * settings.scale)  # scale: the experiment's scale factor
        return [{"loss": ...}]

The runner validates every run's settings against the study's model before the first run
of a file starts, and `StudySettings.estimated_flops` gives `mixerzoo ablate --dry-run`
its cost estimate.

Studies in `mixerzoo.ablate` modules listed in `_BUILTIN_MODULES` (such as `mqar_study`)
register themselves when first looked up; a study defined elsewhere registers when its
module is imported. Built in here: `efficiency` (decode latency, prefill throughput,
state bytes, parameters and FLOPs per token against context).

Plots: a study may register its own plot (`register_study(name, plot=fn)`); named plots
(`register_plot(name)`) can be chosen by any experiment with `plot: <name>`. Built in
here: `frontier` (accuracy against state bytes, zoology's recall-memory frontier).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import Field, field_validator

from mixerzoo.blocks import Decoder, LayoutSpec, flops_per_token, parameter_count, random_state, state_nbytes
from mixerzoo.blocks.spec import MAX_LAYERS, MAX_WIDTH
from mixerzoo.errors import StrictModel
from mixerzoo.registry import recipe

Row = dict[str, Any]
Study = Callable[["RunConfig", Path], list[Row]]
PlotHook = Callable[[list[Row], Path], None]
Chance = Callable[[Row], float | None]


def figure_title(rows: list[Row], what: str) -> str:
    """A plot title: `what`, then the study, the number of runs and the sizes they use."""
    runs = len({r.get("run_key") for r in rows}) or len(rows)
    sizes = ", ".join(sorted({str(r.get("size")) for r in rows if r.get("size") is not None}))
    study = rows[0].get("study") if rows else None
    return f"{what}\n{f'study {study}, ' if study else ''}{runs} runs" + (f", size {sizes}" if sizes else "")


def draw_chance(ax, rows: list[Row], accuracies: list[float]) -> None:
    """A dotted line at each distinct chance level of the rows' runs (`chance_level`), labelled,
    and y limits from 0 to a little above the highest accuracy or chance (not to 1.0 when every
    point is far below it)."""
    levels = sorted({level for level in map(chance_level, rows) if level is not None})
    for level in levels:
        ax.axhline(level, color="grey", linestyle=":", label=f"chance ({level:.3g})")
    top = max([*accuracies, *levels, 0.01])
    ax.set_ylim(0, min(1.02, top * 1.15))


def save_figure(fig, path: Path) -> None:
    """Lay out a matplotlib figure, write it to `path` as a 110-dpi PNG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)

_STUDIES: dict[str, Study] = {}
_SETTINGS: dict[str, type["StudySettings"]] = {}
_CHANCE: dict[str, Chance] = {}
_TIMED: set[str] = set()
_SCORES: dict[str, str] = {}
_PLOTS: dict[str, PlotHook] = {}
_NAMED_PLOTS: dict[str, PlotHook] = {}
_BUILTIN_MODULES = ("mixerzoo.ablate.mqar_study", "mixerzoo.ablate.visual_study", "mixerzoo.ablate.stream_study",
                    "mixerzoo.ablate.lm_study", "mixerzoo.ablate.dense_study")


DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?)$"  # a run's device: cpu, cuda or cuda:N
_LATER_FIELDS = ("layout", "device", "dtype")  # RunConfig fields newer than the first results folders (see key)


def layout_hash(layout: dict[str, Any]) -> str:
    """A short hash of a layout's canonical JSON: names a composed layout in runs and rows."""
    return hashlib.sha256(json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


class RunConfig(StrictModel):
    """One run of a study: a recipe at a size and seed, optional overrides, study settings."""

    study: str = Field(description="the registered study that runs it")
    recipe: str = Field(description="a registered recipe, or the name of the composed `layout`")
    layout: dict[str, Any] | None = Field(None, description="a composed LayoutSpec (from a layout YAML or an "
                                                            "inline mapping); the run uses it instead of a recipe")
    size: str = Field("tiny", description="recipe size: tiny, small or paper (custom for a composed layout)")
    device: str | None = Field(None, pattern=DEVICE_PATTERN,
                               description="where the run's models live: cpu (default), cuda or cuda:N")
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="float32 (default) or bfloat16 autocast (recurrent states stay float32)")
    seed: int = Field(0, description="seed of the weights, the data and the evaluation")
    window: int | None = Field(None, ge=1, description="window of every sliding-window attention layer, if set")
    ratio: str | None = Field(None, pattern=r"^\d+:\d+$",
                              description="'A:G' attention : Gated DeltaNet layer ratio, if set")
    n_layers: int | None = Field(None, ge=1, le=MAX_LAYERS,
                                 description="depth: the recipe's layer list repeated or cut to this many")
    d_model: int | None = Field(None, ge=1, le=MAX_WIDTH,
                                description="width: head counts and MLP width scaled with it, head sizes kept")
    settings: dict[str, Any] = Field(default_factory=dict, description="study-specific settings")

    @field_validator("device", "dtype")
    @classmethod
    def _default_is_unset(cls, value: str | None) -> str | None:
        """cpu and float32 are the defaults: written out, they are the same run (the same key)."""
        return None if value in ("cpu", "float32") else value

    def layout_hash(self) -> str | None:
        """A short hash of the composed layout's canonical JSON (None for a registered recipe)."""
        return None if self.layout is None else layout_hash(self.layout)

    def key(self) -> str:
        """A stable short hash of the run's canonical JSON: identifies the run for resuming. Fields
        added later count only when set, so a results folder of an earlier version still resumes."""
        data = self.model_dump(mode="json")
        for name in _LATER_FIELDS:
            if data[name] is None:
                del data[name]
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The training fields that studies share, as types: a study gives each its own default, e.g. `steps: TrainSteps = 300`.
TrainSteps = Annotated[int, Field(gt=0, description="training steps, multiplied by the experiment's `scale`")]
PeakLR = Annotated[float, Field(gt=0, description="AdamW peak learning rate (warmup, then cosine decay to 0)")]
WarmupSteps = Annotated[int, Field(ge=0, description="linear warmup steps (capped below the step count)")]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW weight decay, on matrices only (mixerzoo.optim)")]


class StudySettings(StrictModel):
    """Base of every study's settings (a run's `settings`): unknown keys are an error, and
    `scale` (set by the runner from the experiment) multiplies training steps."""

    scale: float = Field(1.0, gt=0, description="multiplies training steps (set by the runner from the experiment)")

    def check_spec(self, spec: LayoutSpec) -> None:
        """Raise ValueError if these settings cannot run on `spec` (a study whose task constrains the model
        says so here, so that validation and `--dry-run` catch it before any run starts)."""

    def tokens_per_example(self, spec: LayoutSpec) -> int | None:
        """Tokens in one training / evaluation example: the `seq_len` setting if there is one."""
        return getattr(self, "seq_len", None)

    def estimated_flops(self, spec: LayoutSpec) -> int | None:
        """A rough cost of one run: 6 x parameters per training token (forward and backward)
        plus 2 x parameters per evaluation token, from the `steps`, `batch_size` and
        `eval_examples` settings; None when the settings do not say."""
        tokens = self.tokens_per_example(spec)
        steps, batch = getattr(self, "steps", None), getattr(self, "batch_size", None)
        if tokens is None or steps is None or batch is None:
            return None
        train = max(1, round(steps * self.scale)) * batch * tokens
        evaluate = getattr(self, "eval_examples", 0) * tokens
        return parameter_count(spec) * (6 * train + 2 * evaluate)


def register_study(name: str, *, settings: type[StudySettings], plot: PlotHook | None = None,
                   chance: Chance | None = None, timed: bool = False,
                   score: str | None = None) -> Callable[[Study], Study]:
    """Decorator registering `study(run, scratch_dir) -> rows` under `name`, with its settings
    model (every run's settings are validated against it before any run starts), an optional
    `plot(rows, path)` hook that draws the experiment's rows to a PNG at `path`, an optional
    `chance(row)`: the accuracy of guessing for that row's run (plots draw it), `timed`:
    the study measures wall-clock time, so its runs never share the machine (`jobs` is ignored),
    and `score`: the row column that ranks runs, higher better (an experiment's `best_of` keeps
    each model's best run by it)."""
    if not (isinstance(settings, type) and issubclass(settings, StudySettings)):
        raise TypeError(f"study {name!r}: settings must be a StudySettings subclass, got {settings!r}")

    def decorate(study: Study) -> Study:
        if name in _STUDIES:
            raise ValueError(f"study {name!r} is already registered")
        _STUDIES[name] = study
        _SETTINGS[name] = settings
        if plot is not None:
            _PLOTS[name] = plot
        if chance is not None:
            _CHANCE[name] = chance
        if timed:
            _TIMED.add(name)
        if score is not None:
            _SCORES[name] = score
        return study

    return decorate


def run_device(run: "RunConfig") -> torch.device:
    """The device `run` asks for (cpu by default); a CUDA device this machine lacks is an error."""
    device = torch.device(run.device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"the run asks for device {run.device!r} but this machine has no CUDA device")
    return device


def run_precision(run: "RunConfig") -> contextlib.AbstractContextManager:
    """The autocast context of the run's dtype: bfloat16 autocast on its device, or nothing (float32)."""
    if run.dtype != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(run_device(run).type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settings_class(name: str) -> type[StudySettings]:
    """The settings model of study `name`."""
    get_study(name)
    return _SETTINGS[name]


def study_settings(run: "RunConfig") -> StudySettings:
    """`run.settings` validated by its study's settings model (ValidationError naming the field)."""
    return settings_class(run.study).model_validate(run.settings)


def chance_level(row: Row) -> float | None:
    """The accuracy of guessing for the run of `row` (its study's `chance` hook), or None."""
    _load_builtin()
    hook = _CHANCE.get(row.get("study"))
    return hook(row) if hook is not None else None


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def list_studies() -> list[str]:
    """Registered study names."""
    _load_builtin()
    return sorted(_STUDIES)


def study_score(name: str) -> str | None:
    """The column that ranks study `name`'s runs (higher better), if it has one."""
    get_study(name)
    return _SCORES.get(name)


def is_timed(name: str) -> bool:
    """Whether study `name` measures wall-clock time (its runs run one at a time)."""
    get_study(name)
    return name in _TIMED


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
    """The spec of `run.recipe` at `run.size` (or the run's composed `layout`), with the run's overrides applied.

    `n_layers` repeats or cuts the recipe's layer list to that depth (infinitevl's SGGG at 2
    layers is SG). `d_model` scales the width: every head count (n_heads, n_kv_heads, a parallel layer's
    branches' too) and the MLP's hidden width by d_model / the recipe's, head sizes and state sizes per head kept (a
    width that leaves a fractional head count is an error).
    `ratio` 'A:G' rebuilds the layer list with A attention layers per G Gated DeltaNet
    layers spread evenly over the same depth (the recipe's own attention and Gated
    DeltaNet layers are the templates; a recipe lacking one whose weight is positive is
    an error). '0:1' is all Gated DeltaNet and '1:0' all attention. `window` then sets
    the window of every sliding-window attention layer (full-attention layers stay full;
    a spec without sliding-window layers is unchanged).
    """
    spec = LayoutSpec.model_validate(run.layout) if run.layout is not None else recipe(run.recipe, run.size)
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

    def rescale(mixer: dict, where: str) -> None:
        mixer["d_model"] = d_model
        for field in ("n_heads", "n_kv_heads"):
            if mixer.get(field) is not None:
                mixer[field] = scaled(f"{where}.{field}", mixer[field])
        for i, branch in enumerate(mixer.get("mixers") or []):  # a parallel layer's branches
            rescale(branch, f"{where}.mixers[{i}]")

    data["d_model"] = d_model
    for layer in data["layers"]:
        rescale(layer["mixer"], "mixer")
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
    hold several; chance levels dotted (draw_chance). Rows need numeric
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
    many = len({row.get("ratio") if row.get("ratio") is not None else row.get("recipe") for row in points}) > 8
    fig, axes = plt.subplots(1, len(panels), figsize=((6.5 + 5.5 * many) * len(panels), 4.5 + 1.5 * many),
                             squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        series: dict[str, list[Row]] = {}
        for row in points:
            if row.get("seq_len") == panel:
                name = f"SWA:GDN {row['ratio']}" if row.get("ratio") is not None else str(row.get("recipe"))
                series.setdefault(name, []).append(row)
        labelled = [r for rows_of in series.values() for r in rows_of]
        widths_vary = len({r.get("d_model") for r in labelled}) > 1  # one width: said once, in the x label
        for (name, mine), marker in zip(series.items(), itertools.cycle("osD^vP*X")):
            seeds = max(r["seeds"] for r in mine)
            ax.errorbar([r["state_bytes"] for r in mine], [r["accuracy"] for r in mine],
                        yerr=[r["accuracy_std"] for r in mine], fmt=marker, capsize=3, markersize=6,
                        label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})")
            for r in mine:
                window, width = r.get("swa_window", r.get("window")), r.get("d_model")
                text = " ".join(t for t in (window is not None and f"w={window}", widths_vary and width and f"d={width}") if t)
                if text:
                    ax.annotate(text, (r["state_bytes"], r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
        mine = [r for r in points if r.get("seq_len") == panel]
        draw_chance(ax, [r for r in rows if r.get("seq_len") == panel],
                    [r["accuracy"] + r["accuracy_std"] for r in mine])
        ax.set_xscale("log")
        width = "" if widths_vary or labelled[0].get("d_model") is None else f", d_model {labelled[0]['d_model']}"
        ax.set_xlabel("decoder state (bytes, log scale)" + ("" if panel is None else f" at seq_len {panel}") + width)
        ax.grid(True, which="both", alpha=0.3)
        if len(series) > 8:  # a long legend goes beside the panel, not over its points
            ax.legend(fontsize=7, title="recipe / ratio (seeds)", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      ncol=2 if len(series) > 16 else 1)
        else:
            ax.legend(fontsize=8, title="recipe / ratio (seeds)")
    axes[0][0].set_ylabel("accuracy (fraction of queries, mean ± std over seeds)")
    fig.suptitle(figure_title(rows, "recall against memory (higher and further left is better)"), fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------- efficiency study

class EfficiencySettings(StudySettings):
    """The `efficiency` study's settings."""

    contexts: list[int] = Field(default_factory=lambda: [1024, 4096, 16384], min_length=1,
                                description="contexts (tokens) decode starts from")
    repeats: int = Field(5, gt=0, description="decode steps timed; the median is reported")
    prefill_tokens: int = Field(512, gt=0, description="tokens of the one timed prefill call")
    threads: int | None = Field(None, gt=0, description="torch threads while measuring; default: the current ones")

    @field_validator("contexts")
    @classmethod
    def _positive(cls, contexts: list[int]) -> list[int]:
        if any(c < 1 for c in contexts):
            raise ValueError(f"contexts must be positive, got {contexts}")
        return contexts

    def estimated_flops(self, spec: LayoutSpec) -> int:
        """FLOPs of the timed calls: the prefill (plus its warm-up) and the decode steps at each context."""
        prefill = 2 * parameter_count(spec) * (self.prefill_tokens + 8)
        return prefill + sum(flops_per_token(spec, c) * (self.repeats + 1) for c in self.contexts)


@register_study("efficiency", settings=EfficiencySettings, timed=True)
def efficiency(run: RunConfig, scratch: Path) -> list[Row]:
    """Per context: decode latency, prefill throughput, state bytes (measured and predicted),
    parameters and FLOPs per token of the run's Decoder (float32, batch 1, inference mode).

    Settings: `EfficiencySettings`. Decode starts from a state filled with random values of
    the size `context` tokens leave, not from a prefill (`state_fill="random"` in every row).
    """
    settings = EfficiencySettings.model_validate(run.settings)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads or threads_before)
    try:
        return _efficiency(run, settings.contexts, settings.repeats, settings.prefill_tokens)
    finally:
        torch.set_num_threads(threads_before)


def _efficiency(run: RunConfig, contexts: list[int], repeats: int, prefill_tokens: int) -> list[Row]:
    torch.manual_seed(run.seed)
    spec = build_spec(run)
    device = run_device(run)
    model = Decoder(spec).eval().to(device)
    parameters, rows = parameter_count(spec), []
    with torch.inference_mode():
        prompt = torch.randint(spec.vocab_size, (1, prefill_tokens)).to(device)
        model(prompt[:, :8])  # warm-up
        sync(device)
        start = time.perf_counter()
        model(prompt)
        sync(device)
        prefill_s = time.perf_counter() - start
        for context in contexts:
            state = random_state(model, context)
            token = torch.randint(spec.vocab_size, (1, 1)).to(device)
            model(token, state)  # warm-up
            times = []
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                model(token, state)
                sync(device)
                times.append(time.perf_counter() - start)
            rows.append(dict(
                context=context, decode_latency_ms=statistics.median(times) * 1e3, decode_repeats=repeats,
                state_fill="random", prefill_tokens=prefill_tokens, prefill_tokens_per_s=prefill_tokens / prefill_s,
                state_nbytes=state.nbytes, predicted_state_nbytes=state_nbytes(spec, context, dtype=torch.float32),
                parameters=parameters, flops_per_token=flops_per_token(spec, context), threads=torch.get_num_threads(),
            ))
            del state
    return rows


__all__ = ["Chance", "EfficiencySettings", "PlotHook", "Row", "RunConfig", "Study", "StudySettings", "build_spec",
           "run_device", "run_precision", "study_score", "sync",
           "chance_level", "draw_chance", "figure_title", "frontier_plot", "get_plot", "get_study", "is_timed",
           "list_plots", "list_studies", "register_plot", "register_study", "study_settings"]
