"""The ablation runner: an experiment YAML -> runs -> resumable results.

```yaml
name: efficiency-small          # results go to <out>/<name>/
study: efficiency               # a registered study (mixerzoo.ablate.studies)
sweep:                          # cartesian product, the last key varying fastest
  recipe: [transformer, infinitevl]
  size: [small]
  settings.repeats: [5, 20]     # "settings.<key>" sweeps one study setting
fixed: {contexts: [1024, 4096]} # merged into every run's settings
scale: 1.0                      # passed to studies as settings["scale"]
plot: frontier                  # optional: a registered plot (default: the study's own, else latency vs context)
```

Sweep keys are RunConfig fields (recipe, size, seed, window, ratio, settings: a list of
dicts) or `settings.<key>`; `recipe` is required. A recipe is a registered name, a layout
YAML path (relative to the experiment file; the run is named after the file's stem) or an
inline layout mapping (a LayoutSpec, with an optional `name`); a composed layout has its own
sizes (no `size`), while n_layers, d_model, ratio and window apply to it as to a recipe.
`sweep` may also be a list of such grids: the runs are the grids' runs in order (a run may appear only once). `run_experiment`
appends each finished run's rows to `<out>/<name>/runs.jsonl` (each row: the study's
columns plus the run's fields, its settings as `settings.<key>` columns, and `run_key`),
skips runs already there, and regenerates `results.csv`, `table.md` and `plot.png` from the
rows of the current runs. A YAML file may hold several experiments as documents separated
by `---` (`load_experiments`); `ablate` runs them in order.
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from tqdm import tqdm
from typing_extensions import Self

from mixerzoo.ablate.claims import ResultsFolder
from mixerzoo.ablate.executors import ProcessPool, RayCluster, visible_gpus
from mixerzoo.ablate.studies import (
    DEVICE_PATTERN, Row, RunConfig, Study, build_spec, figure_title, get_plot, get_study, is_timed, layout_hash,
    list_plots, list_studies, run_precision, save_figure, study_score, study_settings,
)
from mixerzoo.ablate.summary import best_over, over_seeds, with_spread
from mixerzoo.blocks.costs import FLOP_UNITS, in_units
from mixerzoo.errors import StrictModel, close_matches, describe_validation_error, read_yaml
from mixerzoo.mixers.base import atomic_write_bytes

_RUN_FIELDS = ("recipe", "size", "seed", "window", "ratio", "n_layers", "d_model", "device", "dtype", "settings")
_SCALARS = (str, int, float, bool, type(None))


class ExperimentConfig(StrictModel):
    """An ablation experiment: a study run over the cartesian product of `sweep`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="results directory name")
    study: str = Field(description="a registered study (mixerzoo.ablate.studies.list_studies)")
    sweep: dict[str, list[Any]] | list[dict[str, list[Any]]] = Field(
        description="a grid (key -> values, cartesian product) or a list of grids whose runs are concatenated")
    fixed: dict[str, Any] = Field(default_factory=dict, description="merged into every run's settings")
    scale: float = Field(1.0, gt=0, description="passed to the study as settings['scale']")
    device: str | None = Field(None, pattern=DEVICE_PATTERN,
                               description="every run's device unless the sweep sets it: cpu (default), cuda, cuda:N")
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="every run's precision unless the sweep sets it: float32 (default) or bfloat16 autocast")
    best_of: str | None = Field(None, description="a swept setting (e.g. lr): the table keeps each model's best "
                                                  "run over it by the study's score, as Zoology reports an lr "
                                                  "sweep; results.csv keeps every run")
    plot: str | None = Field(None, description="a registered plot (mixerzoo.ablate.studies.list_plots); "
                                               "default: the study's own plot, else latency against context")

    @field_validator("study")
    @classmethod
    def _study_is_registered(cls, name: str) -> str:
        if name not in list_studies():
            raise ValueError(f"unknown study {name!r}; registered studies: {list_studies()}")
        return name

    @field_validator("plot")
    @classmethod
    def _plot_is_registered(cls, name: str | None) -> str | None:
        if name is not None and name not in list_plots():
            raise ValueError(f"unknown plot {name!r}; registered plots: {list_plots()}")
        return name

    @field_validator("sweep")
    @classmethod
    def _sweep_keys(cls, sweep: dict[str, list[Any]] | list[dict[str, list[Any]]]) -> Any:
        if not sweep:
            raise ValueError("sweep: needs at least one grid")
        for where, grid in _named_grids(sweep):
            for key, values in grid.items():
                if key not in _RUN_FIELDS and not (key.startswith("settings.") and len(key) > len("settings.")):
                    raise ValueError(f"{where}.{key}: not a run field; use one of {list(_RUN_FIELDS)} "
                                     f"or 'settings.<key>'")
                if not values:
                    raise ValueError(f"{where}.{key}: needs at least one value")
            if "recipe" not in grid:
                raise ValueError(f"{where}.recipe: required (a list of recipe names, layout YAML paths or layouts)")
        return sweep

    @model_validator(mode="after")
    def _best_of_is_swept_and_scored(self) -> Self:
        if self.best_of is None:
            return self
        if study_score(self.study) is None:
            raise ValueError(f"best_of: study {self.study!r} has no score to rank its runs by")
        if not any(f"settings.{self.best_of}" in grid for _, grid in _named_grids(self.sweep)):
            raise ValueError(f"best_of: settings.{self.best_of} is not swept; sweep it to pick the best value")
        return self

    @model_validator(mode="after")
    def _runs_are_valid(self) -> Self:
        from mixerzoo.registry import list_recipes

        for where, grid in _named_grids(self.sweep):
            for recipe in grid["recipe"]:
                if isinstance(recipe, str) and recipe not in list_recipes():
                    raise ValueError(f"{where}.recipe: unknown recipe {recipe!r}{close_matches(recipe, list_recipes())}; "
                                     f"registered: {list_recipes()} "
                                     f"(or a layout YAML path, or an inline layout)")
                if not isinstance(recipe, (str, dict)):
                    raise ValueError(f"{where}.recipe: {recipe!r} is neither a recipe name nor a layout")
                if isinstance(recipe, dict) and "size" in grid:
                    raise ValueError(f"{where}.size: a composed layout has its own sizes; sweep n_layers / d_model "
                                     f"instead")
        seen = set()
        for number, run in enumerate(expand(self), 1):  # every run must validate, settings included
            if run.key() in seen:
                raise ValueError(f"sweep: the run {run.model_dump(exclude={'study', 'settings'})} (settings "
                                 f"{run.settings}) appears twice; every run must be distinct")
            seen.add(run.key())
            try:
                study_settings(run).check_spec(build_spec(run))
            except ValidationError as error:
                problems = "; ".join(".".join(["settings", *map(str, e["loc"])]) + ": " + e["msg"].removeprefix("Value error, ")
                                     for e in error.errors())
                raise ValueError(f"run {number} ({_describe_run(run)}): {problems}") from None
            except ValueError as error:
                raise ValueError(f"run {number} ({_describe_run(run)}): {error}") from None
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ExperimentConfig":
        """The experiment in YAML file `path` (yaml.safe_load), layout paths read relative to it."""
        return cls.model_validate(with_layouts(read_yaml(path), Path(path).parent))


def with_layouts(data: Any, base: Path) -> Any:
    """An experiment mapping whose sweep's layout YAML paths (recipe entries ending in .yaml / .yml,
    relative to `base`) are replaced by the layouts they hold, named after the file's stem."""
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), (dict, list)):
        return data
    grids = data["sweep"] if isinstance(data["sweep"], list) else [data["sweep"]]
    resolved = []
    for grid in grids:
        if isinstance(grid, dict) and isinstance(grid.get("recipe"), list):
            grid = {**grid, "recipe": [_read_layout(r, base) for r in grid["recipe"]]}
        resolved.append(grid)
    return {**data, "sweep": resolved if isinstance(data["sweep"], list) else resolved[0]}


def _read_layout(recipe: Any, base: Path) -> Any:
    if not (isinstance(recipe, str) and recipe.endswith((".yaml", ".yml"))):
        return recipe
    path = base / recipe
    if not path.is_file():
        raise ValueError(f"sweep.recipe: layout file {recipe!r} not found (looked at {path})")
    layout = read_yaml(path)
    if not isinstance(layout, dict):
        raise ValueError(f"{path}: a layout YAML must be a mapping of LayoutSpec fields")
    return {"name": path.stem, **layout}


def _describe_run(run: RunConfig) -> str:
    """recipe/size and the run's other set fields, for messages and the dry-run listing."""
    extra = [f"{f}={getattr(run, f)}" for f in ("seed", "window", "ratio", "n_layers", "d_model")
             if getattr(run, f) not in (None, 0)]
    name = f"{run.recipe}/{run.size}" if run.layout is None else f"{run.recipe} (layout {run.layout_hash()})"
    return " ".join([name, *extra])


def _named_grids(sweep: dict[str, list[Any]] | list[dict[str, list[Any]]]) -> list[tuple[str, dict[str, list[Any]]]]:
    """(where, grid) per grid of a sweep, `where` naming it in errors: 'sweep' or 'sweep[i]'."""
    return [("sweep", sweep)] if isinstance(sweep, dict) else [(f"sweep[{i}]", grid) for i, grid in enumerate(sweep)]


def expand(experiment: ExperimentConfig) -> list[RunConfig]:
    """The experiment's runs: for each grid of its sweep in order, the cartesian product in the
    grid's key order (the last key varying fastest), with `fixed` and `scale` merged into each
    run's settings."""
    runs = []
    for where, grid in _named_grids(experiment.sweep):
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            fields: dict[str, Any] = {}
            settings = dict(experiment.fixed)
            for key, value in zip(keys, values):
                if key == "settings":
                    if not isinstance(value, dict):
                        raise ValueError(f"{where}.settings: each value must be a mapping, got {value!r}")
                    settings.update(value)
                elif key.startswith("settings."):
                    settings[key.removeprefix("settings.")] = value
                else:
                    fields[key] = value
            if isinstance(fields["recipe"], dict):
                fields.update(_composed(fields["recipe"], where))
            for name in ("device", "dtype"):
                if name not in fields and getattr(experiment, name) is not None:
                    fields[name] = getattr(experiment, name)
            settings["scale"] = experiment.scale
            try:
                runs.append(RunConfig(study=experiment.study, settings=settings, **fields))
            except ValidationError as error:
                raise ValueError("; ".join(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in error.errors())) from None
    return runs


def _composed(layout: dict[str, Any], where: str) -> dict[str, Any]:
    """The run fields of an inline layout: its name (given, else 'layout-<hash>') and its validated spec."""
    from mixerzoo.blocks import LayoutSpec

    fields = {k: v for k, v in layout.items() if k != "name"}
    try:
        spec = LayoutSpec.model_validate(fields)
    except ValidationError as error:
        raise ValueError(f"{where}.recipe (layout {layout.get('name', '')!r}): {describe_validation_error(error)}") from None
    data = spec.model_dump(mode="json")
    return {"recipe": str(layout.get("name") or f"layout-{layout_hash(data)}"), "layout": data, "size": "custom"}


def run_row_fields(run: RunConfig) -> Row:
    """The columns a run adds to each of its rows: its key, fields and `settings.<key>` (JSON for non-scalars)."""
    composed = {"layout_hash": run.layout_hash()} if run.layout is not None else {}
    row: Row = {"run_key": run.key(), "study": run.study, "recipe": run.recipe, **composed, "size": run.size,
                "seed": run.seed, "window": run.window, "ratio": run.ratio, "n_layers": run.n_layers,
                "d_model": run.d_model, "device": run.device or "cpu", "dtype": run.dtype or "float32"}
    for key, value in sorted(run.settings.items()):
        row[f"settings.{key}"] = value if isinstance(value, _SCALARS) else json.dumps(value, sort_keys=True)
    return row


def read_rows(path: Path) -> list[Row]:
    """The rows of complete runs in a runs.jsonl file (without the `run_rows` bookkeeping column).

    What a crash while appending leaves is dropped and the file rewritten without it: an
    unparsable last line, and the rows of a run with fewer rows than it reported. An
    unparsable line elsewhere is an error.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = [line for line in data.split(b"\n") if line.strip()]
    rows, damaged = [], bool(data) and not data.endswith(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if number < len(lines):
                raise ValueError(f"{path}: row {number} is malformed and not the last one; fix or remove it")
            damaged = True
            continue
        rows.append(row)
    counts = collections.Counter(row.get("run_key") for row in rows)
    complete = [row for row in rows if counts[row.get("run_key")] == row.get("run_rows")]
    if damaged or len(complete) < len(rows):
        atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in complete).encode())
    return [{k: v for k, v in row.items() if k != "run_rows"} for row in complete]


def _append_rows(path: Path, rows: list[Row]) -> None:
    text = "".join(json.dumps({**row, "run_rows": len(rows)}) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_rows(run: RunConfig, rows: Any) -> list[Row]:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"study {run.study!r} must return a non-empty list of dicts, got {type(rows).__name__}")
    reserved = run_row_fields(run).keys() | {"run_rows"}
    for row in rows:
        clash = sorted(reserved & row.keys())
        if clash:
            raise ValueError(f"study {run.study!r} returned columns {clash} that the runner reserves for run fields")
        bad = sorted(k for k, v in row.items() if not isinstance(v, _SCALARS))
        if bad:
            raise TypeError(f"study {run.study!r} returned non-scalar values in columns {bad}")
    return rows


def _columns(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def to_csv(rows: list[Row]) -> str:
    """The rows as CSV text, columns in first-seen order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def to_markdown(rows: list[Row], title: str) -> str:
    """A markdown table of the rows; columns equal in every row (and `run_key`) are listed above it instead."""
    columns = [c for c in _columns(rows) if c != "run_key" and not _repeats_a_column(rows, c)]
    constant = {c: rows[0].get(c) for c in columns if len(rows) > 1 and all(r.get(c) == rows[0].get(c) for r in rows)}
    shown = [c for c in columns if c not in constant]
    lines = [f"# {title}", ""]
    if constant:
        lines += ["Same in every row: " + ", ".join(f"{c}={'null' if v is None else _cell(v)}" for c, v in constant.items()), ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _repeats_a_column(rows: list[Row], column: str) -> bool:
    """True for a `settings.<key>` column whose values equal the `<key>` column's in every row
    (a study that reports its setting back): the table shows it once."""
    key = column.removeprefix("settings.")
    return key != column and all(key in r and r.get(key) == r.get(column) for r in rows)


def _latency_column(rows: list[Row]) -> str | None:
    return next((c for c in _columns(rows) if "latency" in c and all(isinstance(r.get(c), (int, float)) for r in rows)), None)


def default_plot(rows: list[Row], path: Path) -> bool:
    """If rows have a `context` and a latency column, plot latency against context per recipe
    (and per other varying run field) to PNG `path` and return True; otherwise return False."""
    latency = _latency_column(rows)
    if latency is None or not all(isinstance(r.get("context"), int) for r in rows):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = [f for f in ("recipe", "size", "seed", "window", "ratio") if len({r.get(f) for r in rows}) > 1] or ["recipe"]
    series: dict[str, list[Row]] = {}
    for row in rows:
        series.setdefault(" ".join(f"{row.get(f)}" if f == "recipe" else f"{f}={row.get(f)}" for f in varying), []).append(row)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, mine in series.items():
        mine = sorted(mine, key=lambda r: r["context"])
        ax.plot([r["context"] for r in mine], [r[latency] for r in mine], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # flat recurrent recipes and a growing cache differ by decades
    ax.set_xlabel("context (tokens, log scale)")
    unit = " (ms, log scale)" if latency.endswith("_ms") else " (log scale)"
    ax.set_ylabel(latency.removesuffix("_ms").replace("_", " ") + unit)
    ax.set_title(figure_title(rows, f"{latency.removesuffix('_ms').replace('_', ' ')} against context"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="recipe")
    save_figure(fig, path)
    return True


def _write_outputs(out_dir: Path, experiment: ExperimentConfig, rows: list[Row]) -> None:
    title = f"{experiment.name}: study {experiment.study}, {len({r['run_key'] for r in rows})} runs"
    atomic_write_bytes(out_dir / "results.csv", to_csv(rows).encode())
    per_model = rows
    if experiment.best_of is not None:  # each model at its best value of the swept setting
        column = f"settings.{experiment.best_of}"
        rows = best_over(rows, column, study_score(experiment.study))
        title += f", each at its best {column} by {study_score(experiment.study)}"
        # Each seed keeps its own best value: the mean over seeds and the plot are the model's, whichever each chose.
        per_model = [{k: v for k, v in row.items() if k != column} for row in rows]
    summary = over_seeds(per_model)
    table = to_markdown(rows, title)
    if any(row["seeds"] > 1 for row in summary):
        table = to_markdown(with_spread(summary), f"{title}: mean ± std over seeds") + "\n" + table
    atomic_write_bytes(out_dir / "table.md", table.encode())
    plot = get_plot(experiment.study, experiment.plot) or default_plot
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".plot.", suffix=".png")
    os.close(fd)
    try:
        if plot(per_model, Path(tmp)) is not False:
            os.chmod(tmp, 0o644)
            os.replace(tmp, out_dir / "plot.png")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _run_one(study: Study, run: RunConfig, out_dir: Path | None) -> list[Row]:
    """One run's checked rows, computed in a scratch directory under `out_dir` (`.scratch-<run_key>-*`;
    the system's temporary folder when None, as on a Ray worker) that is deleted after."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".scratch-{run.key()}-") as scratch:
        try:
            with run_precision(run):
                return _check_rows(run, study(run, Path(scratch)))
        except Exception as error:
            raise RuntimeError(f"run {run.key()} failed ({run.model_dump_json()}): {error}") from error


def _remove_scratch(out_dir: Path, keys: set[str]) -> None:
    """Delete the scratch directories that runs `keys` left (a stopped or killed run's)."""
    for path in out_dir.glob(".scratch-*"):
        if path.name.split("-")[1] in keys:
            shutil.rmtree(path, ignore_errors=True)


def run_experiment(experiment: ExperimentConfig, out_root: Path = Path("results"), *, progress: bool = True,
                   jobs: int = 1, backend: Literal["local", "ray"] = "local") -> Path:
    """Run every run of `experiment` that has no rows yet in `<out_root>/<name>/runs.jsonl`,
    appending each run's rows when it finishes, then regenerate results.csv, table.md and
    plot.png from the current runs' rows. Returns the results directory.

    jobs > 1 runs that many runs at once, each in its own process with one torch thread (rows
    are appended as runs finish; the tables keep the sweep's order); a timed study (one that
    measures wall-clock time, such as efficiency) always runs one run at a time. Several
    processes may share the folder: each claims a run before starting it and skips runs that are
    done or claimed by a live process (`ResultsFolder`). An interruption (Ctrl-C, SIGTERM, a
    failed run) starts no new run, stops the workers at once, keeps every finished row, and
    removes the stopped runs' claims and scratch directories. backend "ray" submits the runs as
    Ray tasks (`RayCluster`: `jobs` at once), their rows coming back to this process, which alone
    writes the results folder."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out_dir = Path(out_root) / experiment.name
    folder = ResultsFolder(out_dir)
    jsonl = out_dir / "runs.jsonl"
    runs = expand(experiment)
    keys = {run.key() for run in runs}
    with folder.locked():
        done = {row.get("run_key") for row in read_rows(jsonl)}  # repairs a crashed writer's tail
        _remove_scratch(out_dir, {k for k in keys - done if folder.holder(k) is None})
    study = get_study(experiment.study)
    bar = tqdm(total=len(runs), initial=len(done & keys), desc=experiment.name, unit="run", disable=not progress)
    if is_timed(experiment.study):
        jobs = 1
    in_flight: dict[str, tuple[RunConfig, Any]] = {}  # run key -> (run, its pending result in a worker)

    def claim_next() -> RunConfig | None:
        with folder.locked():  # another process may have finished or claimed some runs meanwhile
            finished = _done_keys(jsonl)
            for run in runs:  # in sweep order
                if run.key() not in in_flight and run.key() not in finished and folder.claim(run.key()):
                    return run
        return None

    def record(run: RunConfig, rows: list[Row]) -> None:
        fields = run_row_fields(run)
        with folder.locked():
            _append_rows(jsonl, [{**fields, **row} for row in rows])
            folder.release(run.key())
        bar.set_postfix_str(f"{run.recipe}/{run.size}")
        bar.update()

    executor = None
    try:
        if jobs == 1 and backend == "local":
            while (run := claim_next()) is not None:
                in_flight[run.key()] = (run, None)
                record(run, _run_one(study, run, out_dir))
                del in_flight[run.key()]
        else:
            if backend == "ray":
                executor = RayCluster(_run_one)
            else:  # on cuda, one worker per GPU in turn: "cuda" in a worker is its own device
                executor = ProcessPool(_run_one, jobs, visible_gpus() if any(r.device == "cuda" for r in runs) else 0)
            while True:
                while len(in_flight) < jobs and (run := claim_next()) is not None:
                    in_flight[run.key()] = (run, executor.submit(study, run, out_dir))
                if not in_flight:
                    break
                finished = [key for key, (_, handle) in in_flight.items() if executor.ready(handle)]
                if not finished:
                    time.sleep(0.1)
                for key in finished:
                    run, handle = in_flight[key]
                    record(run, executor.result(handle))
                    del in_flight[key]
    except BaseException:
        if executor is not None:
            executor.stop()  # the workers stop now, their runs unfinished
        with folder.locked():
            for key in in_flight:
                folder.release(key)
        _remove_scratch(out_dir, set(in_flight))
        raise
    finally:
        if executor is not None:
            executor.close()
        bar.close()
    order = {run.key(): i for i, run in enumerate(runs)}
    with folder.locked():
        rows = sorted((r for r in read_rows(jsonl) if r.get("run_key") in order), key=lambda r: order[r["run_key"]])
        elsewhere = folder.busy_elsewhere(keys - {r["run_key"] for r in rows})
        _write_outputs(out_dir, experiment, rows)
    if elsewhere:
        pids = sorted({claim["pid"] for claim in elsewhere.values()})
        print(f"{experiment.name}: {len(elsewhere)} run(s) still running in another process (pid {pids}); "
              f"the tables hold the finished ones", file=sys.stderr)
    return out_dir


def load_experiments(path: str | os.PathLike, *, scale: float | None = None, device: str | None = None,
                     dtype: str | None = None, only: Sequence[str] | None = None) -> list[ExperimentConfig]:
    """The experiments in YAML file `path`: one per YAML document (documents separated by
    `---`), each validated, with `scale`, `device` and `dtype` overriding theirs if given; with `only`,
    those of these names (every document still validated). ValueError naming the document for an invalid
    one or a name used twice, and naming an `only` name no document has."""
    documents = [data for data in read_yaml(path, documents=True) if data is not None]
    if not documents:
        raise ValueError(f"{path}: no experiment in the file")
    experiments = []
    for number, data in enumerate(documents, 1):
        where = f"{path}" if len(documents) == 1 else f"{path}, document {number}"
        if isinstance(data, dict):
            given = {"scale": scale, "device": device, "dtype": dtype}
            data = {**data, **{k: v for k, v in given.items() if v is not None}}
        try:
            experiments.append(ExperimentConfig.model_validate(with_layouts(data, Path(path).parent)))
        except ValidationError as error:
            raise ValueError(f"{where}: {describe_validation_error(error)}") from None
        if experiments[-1].name in [e.name for e in experiments[:-1]]:
            raise ValueError(f"{where}: name {experiments[-1].name!r} is used by an earlier document; "
                             f"each experiment needs its own results directory")
    if only is None:
        return experiments
    names = [e.name for e in experiments]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ValueError(f"{path}: no experiment named {unknown[0]!r}; its experiments are {names}")
    return [e for e in experiments if e.name in only]


# A rough training rate for the cost estimate: the tiny recipes trained at 14-25 GFLOP/s
# (6 x parameters x tokens over train_seconds) on one thread of a shared 2-core x86-64 CPU
# in experiments/quick.yaml. Only an order of magnitude: measure your own machine.
ASSUMED_FLOP_PER_S = 15e9


def _done_keys(path: Path) -> set[str]:
    """run_key of every parsable row in a runs.jsonl file, read without repairing it."""
    keys = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            keys.add(json.loads(line)["run_key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


def _flop(value: float | None) -> str:
    return "?" if value is None else in_units(value, FLOP_UNITS)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def dry_run(path: str | os.PathLike, out_root: str | os.PathLike = "results", *, scale: float | None = None,
            device: str | None = None, dtype: str | None = None, only: Sequence[str] | None = None) -> str:
    """What `ablate` would do, as markdown, running and writing nothing: per experiment in
    YAML file `path` (all validated; those named in `only`, if given), each run with the settings that vary
    between runs, whether it already has rows under `out_root`, and its estimated cost
    (`StudySettings.estimated_flops`); then the total to run and a wall time at the FLOP rate the
    finished runs measured (their estimated FLOPs over their train_seconds, the median; run one run
    of the sweep first, on the hardware that will run the rest), else at ASSUMED_FLOP_PER_S."""
    lines, to_run, unknown, rates = [], 0.0, 0, []
    for experiment in load_experiments(path, scale=scale, device=device, dtype=dtype, only=only):
        runs = expand(experiment)
        done = _done_keys(Path(out_root) / experiment.name / "runs.jsonl")
        rates += _measured_rates(Path(out_root) / experiment.name / "runs.jsonl", runs)
        keys = sorted({k for run in runs for k in run.settings})
        varying = [k for k in keys if len({json.dumps(run.settings.get(k), sort_keys=True) for run in runs}) > 1]
        fixed = {k: runs[0].settings[k] for k in keys if k not in varying and k in runs[0].settings}
        lines += [f"## {experiment.name}: study {experiment.study}, {len(runs)} runs, "
                  f"{len([r for r in runs if r.key() not in done])} to run", "",
                  "Same in every run: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in fixed.items()), "",
                  "| # | run | " + "".join(f"{k} | " for k in varying) + "status | estimated cost |",
                  "|---:|---|" + "---|" * len(varying) + "---|---:|"]
        for number, run in enumerate(runs, 1):
            flops = study_settings(run).estimated_flops(build_spec(run))
            status = "done" if run.key() in done else "to run"
            if status == "to run":
                to_run += flops or 0
                unknown += flops is None
            cells = "".join(f"{json.dumps(run.settings.get(k))} | " for k in varying)
            lines.append(f"| {number} | {_describe_run(run)} | {cells}{status} | {_flop(flops)} |")
        lines.append("")
    if rates:
        rate = statistics.median(rates)
        basis = f"{rate / 1e9:.1f} GFLOP/s, the median rate {len(rates)} finished run(s) measured"
    else:
        rate = ASSUMED_FLOP_PER_S
        basis = (f"{rate / 1e9:.0f} GFLOP/s (one CPU thread, assumed: run one run of the sweep first for a "
                 f"measured rate; an order of magnitude only)")
    lines.append(f"Estimated cost to run: {_flop(to_run)}, roughly {_duration(to_run / rate)} at {basis}"
                 + (f"; {unknown} runs have no estimate" if unknown else "") + ".")
    return "\n".join(lines) + "\n"


def _measured_rates(jsonl: Path, runs: list[RunConfig]) -> list[float]:
    """FLOP/s of each finished run of `runs` in `jsonl`: its estimated FLOPs over its train_seconds."""
    by_key = {run.key(): run for run in runs}
    rates = []
    for line in jsonl.read_text().splitlines() if jsonl.exists() else []:  # read only: a dry run writes nothing
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        run = by_key.get(row.get("run_key")) if isinstance(row, dict) else None
        seconds = row.get("train_seconds")
        if run is None or not isinstance(seconds, (int, float)) or seconds <= 0:
            continue
        flops = study_settings(run).estimated_flops(build_spec(run))
        if flops:
            rates.append(flops / seconds)
    return rates


def ablate(path: str | os.PathLike, out_root: str | os.PathLike = "results", *, scale: float | None = None,
           progress: bool = True, jobs: int | None = None, device: str | None = None, dtype: str | None = None,
           jobs_per_gpu: int = 1, backend: Literal["local", "ray"] = "local", only: Sequence[str] | None = None) -> str:
    """Run the experiments in YAML file `path` in order (all validated first; `scale`, `device` and
    `dtype` override theirs if given; `only` names the ones to run; `jobs` runs at once, see run_experiment:
    by default one, or `jobs_per_gpu` per visible GPU for runs on "cuda", or every run on `backend` "ray")
    and return their markdown tables, separated by blank lines."""
    experiments = load_experiments(path, scale=scale, device=device, dtype=dtype, only=only)
    if jobs is None and backend == "ray":
        jobs = max(len(expand(e)) for e in experiments)  # every run submitted: the cluster schedules them
    elif jobs is None:
        on_gpu = any(run.device == "cuda" for e in experiments for run in expand(e))
        jobs = max(1, visible_gpus() * jobs_per_gpu) if on_gpu else 1
    tables = [(run_experiment(e, Path(out_root), progress=progress, jobs=jobs, backend=backend) / "table.md").read_text()
              for e in experiments]
    return "\n".join(tables)


__all__ = ["ASSUMED_FLOP_PER_S", "ExperimentConfig", "ablate", "default_plot", "dry_run", "expand", "load_experiments", "read_rows", "run_experiment",
           "run_row_fields", "to_csv", "to_markdown"]
