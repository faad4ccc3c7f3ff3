"""``visiontrain tune``: a small-budget hyperparameter search with Optuna.

Each trial is a normal run (``run.dir/<study>/trial-NNNN``) built from the config with the
trial's sampled values, ``tune.epochs`` epochs and ``tune.data_fraction`` of the training
data, all with the same ``train.seed`` so that trials differ only by their parameters. The
objective is the run's best monitored value (summary.json's ``best_score``); a callback
reports it after every validation so that a pruner can stop hopeless trials early.

The study lives in a database (SQLite in the study folder by default, any SQLAlchemy URL
otherwise). ``tune.trials`` is the size of the whole study, not of one process: a re-run of
an interrupted command runs only the missing trials, and several processes on one study
share the work. Trials whose process died are found by Optuna's heartbeat and failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from visiontrain.config import (
    Config,
    build_config,
    parse_overrides,
    read_yaml,
    set_values,
)
from visiontrain.engine.callbacks import Callback
from visiontrain.errors import EXIT_FAILURE, EXIT_OK, ConfigError, Interrupted, UserError
from visiontrain.io import atomic_write, atomic_write_json, atomic_write_text
from visiontrain.rundir import TUNE_BEST

if TYPE_CHECKING:
    from visiontrain.engine.signals import StopFlag
    from visiontrain.engine.trainer import Trainer

# A live worker writes a heartbeat every HEARTBEAT_INTERVAL_S; a RUNNING trial whose last
# heartbeat is older than HEARTBEAT_GRACE_S belongs to a dead process and is failed.
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 30
# How often a worker looks again while the last trials of the study run elsewhere.
POLL_S = 2.0
# Keys tune sets for every trial; on tune's command line they would be overridden.
TRIAL_KEYS = (
    "train.epochs",
    "train.min_updates",
    "train.progress",
    "data.train_fraction",
    "run.resume",
)
# Config keys that do not change what a trial computes: a study may be resumed with
# different values of these (more trials, another storage URL, a progress mode).
NOT_SIGNATURE = ("run.", "train.progress", "tune.trials", "tune.storage", "tune.study")
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
_ACTIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class TrialFailedError(RuntimeError):
    """A trial failed at run time (NaN loss, a crash); the study goes on without it."""


class SurplusTrialError(RuntimeError):
    """Another worker filled the study while this trial was being created."""


@dataclass
class Search:
    """A resolved search: the base config, where the study lives, which way is better."""

    tree: dict[str, Any]
    cli_values: dict[str, Any]
    cfg: Config
    study_name: str
    folder: Path
    storage_url: str
    direction: str

    @property
    def monitor(self) -> str:
        """The metric every trial is scored by (``train.monitor``)."""
        return str(self.cfg.train.monitor)

    @property
    def space(self) -> dict[str, dict[str, list[Any]]]:
        """Dotted key → ``{kind: values}``, as validated by :class:`TuneConfig`."""
        return self.cfg.tune.space


# --------------------------------------------------------------------------- configs


def plan_search(path: str | None, overrides: Sequence[str]) -> Search:
    """Validate the config and the search space; nothing is written.

    Args:
        path: the YAML config, or None for the defaults.
        overrides: ``key=value`` items from the command line.

    Returns:
        The resolved search.

    Raises:
        ConfigError: an invalid key, space or bound, or a key tune sets itself.

    """
    tree = read_yaml(path) if path is not None else {}
    source = f"{path} + overrides" if path is not None else "command line"
    cfg = build_config(tree, overrides, source)
    cli_values = dict(parse_overrides(overrides))
    if not cfg.tune.space:
        raise ConfigError(
            "tune.space is empty: nothing to search. Add keys such as "
            "`tune.space={optim.lr: {log_uniform: [1e-4, 1e-2]}}` (see docs/config.md#tune)."
        )
    fixed = sorted(k for k in cli_values if k in TRIAL_KEYS)
    if fixed:
        raise ConfigError(
            f"{', '.join(f'`{k}`' for k in fixed)} set on the tune command line, but tune sets "
            "it for every trial. Use tune.epochs and tune.data_fraction; resume a study by "
            "re-running the same command."
        )
    clash = sorted(set(cli_values) & set(cfg.tune.space))
    if clash:
        raise ConfigError(
            f"{', '.join(f'`{k}`' for k in clash)} is both set on the command line and searched "
            "in tune.space, so the value given would be ignored. Drop one of them."
        )
    if cfg.run.resume is not None:
        raise ConfigError(
            "run.resume is set, but tune does not resume single runs: re-run the same tune "
            "command to continue its study. Remove run.resume."
        )
    if cfg.data.train_fraction is not None:
        raise ConfigError(
            "data.train_fraction is set, but tune trials train on tune.data_fraction of the "
            "data. Set tune.data_fraction instead (train --from uses data.train_fraction)."
        )
    study = cfg.tune.study or cfg.run.name or f"tune-{cfg.task}-{cfg.data.name}"
    if not study or "/" in study or study in (".", ".."):
        raise ConfigError(f"tune.study={study!r} must be a plain folder name.")
    folder = Path(cfg.run.dir).expanduser() / study
    storage = cfg.tune.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    search = Search(tree, cli_values, cfg, study, folder, storage, "maximize")
    search.direction = _check_space(search)
    return search


def trial_config(search: Search, values: dict[str, Any], number: int | str) -> Config:
    """The config of one trial: base config, sampled values, the trial budget and folder."""
    t = search.cfg.tune
    fixed = {
        "train.epochs": t.epochs,
        # A trial's budget is tune.epochs: a recipe's update floor would lengthen it.
        "train.min_updates": None,
        "data.train_fraction": t.data_fraction,
        "train.progress": "none",
        "run.dir": str(search.folder),
        "run.name": f"trial-{number:04d}" if isinstance(number, int) else number,
    }
    # Command-line overrides first, then what the search owns: sampled values and budget.
    tree = set_values(search.tree, {**search.cli_values, **values, **fixed})
    return build_config(tree, source=f"tune trial {number} ({_format_values(values)})")


def _check_space(search: Search) -> str:
    """Build configs at every bound and choice before any trial runs; return the direction.

    A bound that the schema refuses (``optim.lr`` above 10) or a choice that does not build
    (an unknown ``loss.name``) would fail every trial that draws it; failing here names it.
    """
    from visiontrain.api import assemble

    quiet = Console(quiet=True)
    corner = {k: next(iter(spec.values()))[0] for k, spec in search.space.items()}
    for key, spec in search.space.items():
        for value in next(iter(spec.values())):
            try:
                cfg = trial_config(search, {**corner, key: value}, "trial-check")
            except ConfigError as exc:
                raise ConfigError(
                    f"tune.space `{key}` reaches {value!r}, which the config refuses: {exc}"
                ) from None
            if "choice" in spec or value == corner[key]:
                # Names (losses, models, optimizers) are only checked when built.
                assemble(cfg, quiet, check_only=True)
    cfg = trial_config(search, corner, "trial-check")
    mode = cfg.train.monitor_mode
    if mode == "auto":
        import torch

        from visiontrain.data import build_data
        from visiontrain.tasks import build_task

        bundle = build_data(cfg.data, cfg.task)
        mode = build_task(cfg, bundle, torch.device("cpu")).monitor_mode(str(cfg.train.monitor))
    return "minimize" if mode == "min" else "maximize"


def _signature(cfg: Config) -> dict[str, Any]:
    """What makes trials comparable: the resolved config less run bookkeeping."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and prefix != "tune.space.":
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
            return
        key = prefix[:-1]
        if not any(key == n or (n.endswith(".") and key.startswith(n)) for n in NOT_SIGNATURE):
            flat[key] = node

    walk(cfg.to_dict(), "")
    return flat


# --------------------------------------------------------------------------- optuna parts


def suggest(trial: optuna.Trial, space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Draw one value per searched key through the trial's sampler."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        kind, bounds = next(iter(spec.items()))
        if kind == "choice":
            values[key] = trial.suggest_categorical(key, bounds)
        elif kind == "int":
            values[key] = trial.suggest_int(key, int(bounds[0]), int(bounds[1]))
        else:
            values[key] = trial.suggest_float(key, bounds[0], bounds[1], log=kind == "log_uniform")
    return values


class _PerTrialSeed(BaseSampler):
    """A sampler re-seeded from (``tune.seed``, trial number) before each trial.

    One seeded sampler per process would repeat its sequence in every process: a resumed
    study would re-draw the parameters of its first trials, and two workers would draw the
    same values. Seeding by trial number keeps a study reproducible and its trials distinct.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int) -> None:
        self._factory, self._seed = factory, seed
        self._inner = factory(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        state = np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
        self._inner = self._factory(int(state))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)


def make_sampler(name: str, seed: int, trials: int) -> BaseSampler:
    """``random`` or ``tpe``, seeded per trial."""
    if name == "tpe":
        # TPE starts with random trials; Optuna's 10 would be the whole of a small budget,
        # so a third of the study (at least 3) explores before the model takes over.
        startup = min(10, max(3, trials // 3))
        return _PerTrialSeed(
            lambda s: optuna.samplers.TPESampler(n_startup_trials=startup, seed=s), seed
        )
    return _PerTrialSeed(lambda s: optuna.samplers.RandomSampler(seed=s), seed)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """``none``, ``median`` or ``asha`` (asynchronous successive halving).

    Nothing is pruned before half of a trial's epochs: on imbalanced data every trial
    scores the same after one epoch (all "ok": macro F1 0.49 on defects), and pruning on
    that number threw away six of eight trials in a measured 4-epoch study.
    """
    warmup = max(1, epochs // 2)
    if name == "median":
        # Optuna's default waits for 5 finished trials: most of a small budget.
        # Steps are epochs done (1-based), so steps up to `warmup` are never pruned.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup)
    if name == "asha":
        # Epochs are the resource; rungs at warmup, 3x warmup ... keep a third at each.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(search: Search) -> optuna.Study:
    """Create the study, or load it when it exists and searches the same thing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    t = search.cfg.tune
    url = search.storage_url
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        search.folder.mkdir(parents=True, exist_ok=True)
        # Several workers write one SQLite file: wait for its lock instead of failing.
        engine = {"connect_args": {"timeout": 60}}
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:
        shown = "(unparsable URL)"
    last: Exception | None = None
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=HEARTBEAT_GRACE_S,
                )
            study = optuna.create_study(
                study_name=search.study_name,
                storage=storage,
                load_if_exists=True,
                direction=search.direction,
                sampler=make_sampler(t.sampler, t.seed, t.trials),
                pruner=make_pruner(t.pruner, t.epochs),
            )
            break
        except SQLAlchemyError as exc:
            # Two workers creating one new SQLite file can race on its tables: try again.
            last = exc
            time.sleep(0.5 * (attempt + 1))
        except (ValueError, ImportError, ModuleNotFoundError) as exc:
            raise ConfigError(f"cannot open tune.storage {shown}: {exc}") from None
    else:
        raise ConfigError(f"cannot open tune.storage {shown}: {last}") from None
    _check_same_search(study, search)
    return study


def _check_same_search(study: optuna.Study, search: Search) -> None:
    """Refuse to add trials to a study that searched something else."""
    if study.direction.name.lower() != search.direction:
        raise UserError(
            f"study {search.study_name} in {search.folder} was created to "
            f"{study.direction.name.lower()} its score; this config would {search.direction} "
            f"{search.monitor}. Choose another tune.study."
        )
    mine = _signature(trial_config(search, {}, "trial-check"))
    theirs = study.user_attrs.get("signature")
    if theirs is None:
        study.set_user_attr("signature", mine)
        study.set_user_attr("monitor", search.monitor)
        return
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        listed = ", ".join(f"`{k}`" for k in changed[:8]) + (" ..." if len(changed) > 8 else "")
        raise UserError(
            f"study {search.study_name} ({search.folder}) was run with a different config "
            f"({listed} differ), so its trials would not be comparable. Re-run with the "
            "config it was started with, or choose another tune.study."
        )


class PruneCallback(Callback):
    """Reports the monitored value to the trial after each validation; prunes on request."""

    name = "tune_pruner"

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, trainer: Trainer) -> None:  # noqa: D102
        value = trainer.monitor_value
        if not trainer.evaluated_this_epoch or value is None or not math.isfinite(value):
            return
        # Epochs done is the resource the pruners compare trials at.
        self.trial.report(value, trainer.epochs_done)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after epoch {trainer.epochs_done}: {trainer.cfg.train.monitor} {value:.4g}"
            )


# --------------------------------------------------------------------------- running


def _format_values(values: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


def run_trial(search: Search, trial: optuna.Trial, stop_flag: StopFlag) -> float:
    """The objective: train one trial's run and return its best monitored value.

    Raises:
        SurplusTrialError: the study already has ``tune.trials`` trials done or running.
        optuna.TrialPruned: the pruner stopped the trial.
        TrialFailedError: the run failed at run time or never produced a finite score.

    """
    from visiontrain.api import assemble, fit_and_summarise

    target = search.cfg.tune.trials
    # Trial numbers are handed out in order by the database, so counting the trials before
    # this one settles a race between workers that both saw one free place.
    ahead = trial.study.get_trials(deepcopy=False, states=_ACTIVE)
    if sum(t.number < trial.number for t in ahead) >= target:
        trial.set_user_attr("surplus", True)
        raise SurplusTrialError(f"study already has {target} trials")
    values = suggest(trial, search.space)
    cfg = trial_config(search, values, trial.number)
    run_dir = Path(cfg.run.dir) / str(cfg.run.name)
    trial.set_user_attr("run_dir", str(run_dir))
    start = time.perf_counter()
    trainer = None
    try:
        trainer = assemble(cfg, Console(quiet=True), stop_flag=stop_flag)
        assert trainer is not None
        trainer.callbacks.append(PruneCallback(trial))
        summary = fit_and_summarise(trainer, start)
    except (UserError, Interrupted, optuna.TrialPruned):
        raise
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        if run_dir.is_dir():
            atomic_write_text(run_dir / "error.txt", traceback.format_exc())
        raise TrialFailedError(str(exc)) from exc
    score = summary["best_score"]
    if score is None or not math.isfinite(score):
        trial.set_user_attr("error", f"no finite {search.monitor} (NaN or infinite loss?)")
        raise TrialFailedError(trial.user_attrs["error"])
    return float(score)


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in _DONE for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return done, running


def run_search(search: Search, study: optuna.Study, console: Console, stop_flag: StopFlag) -> None:
    """Run trials until the study holds ``tune.trials`` complete or pruned ones."""
    target = search.cfg.tune.trials
    done, running = _counts(study)
    if done:
        console.print(f"study {search.study_name}: {done} of {target} trials done", highlight=False)
    waiting = False
    while True:
        if stop_flag:
            raise Interrupted(
                stop_flag.exit_code or 1,
                f"tune stopped by signal between trials; re-run the same command to continue "
                f"study {search.study_name}.",
            )
        _fail_stale(study)
        done, running = _counts(study)
        if done >= target:
            return
        if done + running >= target:
            if not waiting:
                console.print(
                    f"waiting for {running} running trial(s) (a trial whose worker died is "
                    f"failed after {HEARTBEAT_GRACE_S} s without a heartbeat)",
                    highlight=False,
                )
                waiting = True
            time.sleep(POLL_S)
            continue
        waiting = False
        study.optimize(
            lambda trial: run_trial(search, trial, stop_flag),
            n_trials=1,
            catch=(TrialFailedError, SurplusTrialError),
            callbacks=[lambda study, trial: _report_trial(console, search, trial)],
        )


def _report_trial(console: Console, search: Search, trial: FrozenTrial) -> None:
    if trial.user_attrs.get("surplus"):
        return
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    state = trial.state.name.lower()
    if trial.state == TrialState.COMPLETE:
        outcome = f"{search.monitor} {trial.value:.4g}"
    elif trial.state == TrialState.PRUNED:
        last = trial.intermediate_values
        outcome = f"pruned at epoch {max(last)}" if last else "pruned"
    else:
        outcome = f"failed: {trial.user_attrs.get('error', 'see the log')}"
    console.print(
        f"trial {trial.number}: {_format_values(trial.params)} → {outcome} ({state}, "
        f"{seconds:.1f} s)",
        highlight=False,
    )


# --------------------------------------------------------------------------- outputs


def trial_rows(study: optuna.Study, space: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """One row per trial (surplus ones left out), in trial-number order."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.user_attrs.get("surplus"):
            continue
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "score": t.value if t.state == TrialState.COMPLETE else None,
                **{k: t.params.get(k) for k in space},
                "epochs": max(t.intermediate_values) if t.intermediate_values else 0,
                "last_value": (
                    t.intermediate_values[max(t.intermediate_values)]
                    if t.intermediate_values
                    else None
                ),
                "duration_s": round(t.duration.total_seconds(), 3) if t.duration else None,
                "run_dir": t.user_attrs.get("run_dir", ""),
            }
        )
    return rows


def write_outputs(search: Search, study: optuna.Study) -> tuple[list[dict[str, Any]], dict | None]:
    """Write trials.csv, best.json and the two plots; return the rows and the best."""
    rows = trial_rows(study, search.space)
    search.folder.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    atomic_write_text(search.folder / "trials.csv", text.getvalue())
    complete = [r for r in rows if r["state"] == "complete"]
    best = None
    if complete:
        pick = min if search.direction == "minimize" else max
        row = pick(complete, key=lambda r: r["score"])
        best = {
            "score": row["score"],
            "monitor": search.monitor,
            "mode": "min" if search.direction == "minimize" else "max",
            "overrides": {k: row[k] for k in search.space},
            "trial": row["number"],
            "run_dir": row["run_dir"],
            "study": search.study_name,
        }
        atomic_write_json(search.folder / TUNE_BEST, best)
    plot_history(rows, search, search.folder / "tune_history.png")
    plot_params(rows, search, search.folder / "tune_params.png")
    return rows, best


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def plot_history(rows: list[dict[str, Any]], search: Search, path: Path) -> None:
    """Score per trial (pruned ones at their last value) with the best-so-far line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["last_value"] is not None]
    ax.scatter([r["number"] for r in done], [r["score"] for r in done], label="complete", zorder=3)
    if pruned:
        ax.scatter(
            [r["number"] for r in pruned],
            [r["last_value"] for r in pruned],
            marker="x",
            color="grey",
            label="pruned (last value)",
        )
    if done:
        better = min if search.direction == "minimize" else max
        xs, best, run = [], [], None
        for r in done:
            run = r["score"] if run is None else better(run, r["score"])
            xs.append(r["number"])
            best.append(run)
        ax.step(xs, best, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(search.monitor)
    ax.set_title(f"{search.study_name}: {len(done)} complete, {len(pruned)} pruned")
    ax.legend(loc="best", fontsize="small")
    _save_figure(fig, path)


def plot_params(rows: list[dict[str, Any]], search: Search, path: Path) -> None:
    """Score against each searched parameter (log axis for log_uniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(search.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    done = [r for r in rows if r["state"] == "complete"]
    for ax, key in zip(axes[0], keys, strict=True):
        kind, values = next(iter(search.space[key].items()))
        ys = [r["score"] for r in done]
        if kind == "choice":
            labels = [str(v) for v in values]
            xs = [labels.index(str(r[key])) for r in done]
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        else:
            xs = [r[key] for r in done]
            if kind == "log_uniform":
                ax.set_xscale("log")
        ax.scatter(xs, ys)
        ax.set_xlabel(key)
        ax.set_ylabel(search.monitor)
    _save_figure(fig, path)


def _count(n: int, noun: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_results(
    console: Console, search: Search, rows: list[dict[str, Any]], best: dict | None
) -> None:
    """The trials as a rich table, then the best trial."""
    table = Table(title=f"study {search.study_name} ({search.direction} {search.monitor})")
    for col in ("trial", "state", "score", *search.space, "epochs", "time s"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in search.space]
        table.add_row(
            str(r["number"]),
            r["state"],
            "" if r["score"] is None else f"{r['score']:.4f}",
            *cells,
            str(r["epochs"]),
            "" if r["duration_s"] is None else f"{r['duration_s']:.1f}",
        )
    console.print(table)
    if best is not None:
        scores = [r["score"] for r in rows if r["score"] is not None]
        # A tie is no evidence for one setting: say so instead of naming the first.
        tie = len(scores) > 1 and len({round(s, 12) for s in scores}) == 1
        console.print(
            f"best: trial {best['trial']}, {best['monitor']} {best['score']:.4f} with "
            f"{_format_values(best['overrides'])} ({best['run_dir']})"
            + (f" — all {len(scores)} scored trials tie; the first is kept" if tie else ""),
            highlight=False,
        )


def cmd_tune(args: argparse.Namespace, console: Console) -> int:
    """Run or continue a study; the last line printed is the study folder."""
    from visiontrain.config import split_items  # the CONFIG + key=value rule of `train`
    from visiontrain.engine.signals import graceful_stop

    path, overrides = split_items(args.items)
    search = plan_search(path, overrides)
    if "loss" in search.monitor and any(k.startswith("loss.") for k in search.space):
        # Focal and cross-entropy (or smoothed and plain) losses live on different scales.
        console.print(
            f"warning: tune.space changes the loss while trials are scored by "
            f"{search.monitor}, so their scores are not comparable; set train.monitor to a "
            "metric such as val/macro_f1.",
            highlight=False,
        )
    # Optuna's own lines (and a warning per failed trial) would repeat ours.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = open_study(search)
        console.print(
            f"study {search.study_name}: {_count(search.cfg.tune.trials, 'trial')} of "
            f"{_count(search.cfg.tune.epochs, 'epoch')}, {search.cfg.tune.sampler} sampler, "
            f"{search.cfg.tune.pruner} pruner, {search.direction} {search.monitor}",
            highlight=False,
        )
        with graceful_stop() as flag:
            try:
                run_search(search, study, console, flag)
            except Interrupted as exc:
                write_outputs(search, study)
                done, _ = _counts(study)
                raise Interrupted(
                    exc.exit_code,
                    f"tune stopped by signal ({done} of {search.cfg.tune.trials} trials done; "
                    "an interrupted trial is recorded as failed). Re-run the same command to "
                    f"continue study {search.study_name}.",
                ) from None
        rows, best = write_outputs(search, study)
    finally:
        optuna.logging.set_verbosity(verbosity)
    print_results(console, search, rows, best)
    if best is None:
        console.print("no trial completed: see the failed trials' error.txt", highlight=False)
    print(search.folder, flush=True)
    return EXIT_OK if best is not None else EXIT_FAILURE


# --------------------------------------------------------------------------- train --from


def read_best(path: str | Path) -> dict[str, Any]:
    """The ``overrides`` of a best.json written by ``visiontrain tune``.

    Raises:
        UserError: the file is missing, not JSON, or holds no overrides.

    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--from {path}: no such file. Pass the best.json of a tune study.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"--from {path}: not a JSON file ({exc}). Pass a tune best.json.") from None
    overrides = data.get("overrides") if isinstance(data, dict) else None
    if not isinstance(overrides, dict) or not overrides:
        raise UserError(
            f"--from {path}: no `overrides` mapping of dotted keys to values. Pass the "
            "best.json that `visiontrain tune` wrote."
        )
    return overrides


def config_from_best(path: str | None, overrides: Sequence[str], best: str | Path) -> Config:
    """CONFIG with best.json's overrides applied; command-line ``key=value`` still win."""
    tree = read_yaml(path) if path is not None else {}
    values = read_best(best)
    source = f"{path or 'defaults'} + {best} + overrides"
    return build_config(set_values(tree, values), overrides, source)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``tune`` sub-command to the CLI's sub-parsers.

    Args:
        sub: the object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``tune`` parser.

    """
    p = sub.add_parser(
        "tune",
        help="search hyperparameters with Optuna (small budgets)",
        description="Search the keys of tune.space with Optuna: each trial is a normal run "
        "in run.dir/<study>/trial-NNNN with tune.epochs epochs on tune.data_fraction of "
        "the training data, scored by its best train.monitor. The study is kept in a "
        "database (SQLite in the study folder by default): re-running the command continues "
        "it, and several processes may share it. Writes best.json, trials.csv, "
        "tune_history.png and tune_params.png; the last line printed is the study folder. "
        "Train the winner with `visiontrain train CONFIG --from <study>/best.json`.",
        epilog="Example: visiontrain tune configs/defects.yaml "
        "'tune.space={optim.lr: {log_uniform: [1e-4, 1e-2]}}' tune.trials=8",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.set_defaults(func=cmd_tune)
    return p
