"""Command line: parse → build → run. Exit codes: 0 ok, 2 bad input, 130/143 signal, 1 other."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visiontrain.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_SIGINT,
    Interrupted,
    RunError,
    UserError,
    clean_message,
)
from visiontrain.headline import HEADLINE_ORDER
from visiontrain.version import __version__

EPILOG = (
    "Config keys are dotted on the command line: optim.lr=3e-4 train.epochs=20 "
    "data.root=./pets. Sections: task, data, model, loss, optim, schedule, train, run."
)


def metric_tables(metrics: dict[str, Any], split: str) -> list[Table]:
    """Rich tables of one split's metrics: per class (P/R/F1/support) or per target."""
    # Several regression targets have units of their own: an MAE or RMSE averaged over
    # them adds metres to kilograms, so the headline keeps the unit-free numbers and the
    # per-target table gives the rest.
    in_units = {"mae", "rmse"} if len(metrics.get("per_target") or {}) > 1 else set()
    title = f"{split}: " + "  ".join(
        f"{key.replace('_', ' ')} {metrics[key]:.4f}"
        for key in HEADLINE_ORDER
        if isinstance(metrics.get(key), int | float) and key not in in_units
    )
    title += f"  ({metrics.get('samples', 0)} images)"
    if in_units:
        title += "; mae and rmse per target below (each in its target's units)"
    tables = []
    for key, label in (("per_class", "class"), ("per_target", "target")):
        rows = metrics.get(key)
        if not rows:
            continue
        # Columns as the task wrote them: P/R/F1/support, AP, IoU/Dice, MAE/RMSE/R²...
        columns = list(next(iter(rows.values())))
        table = Table(title=title)
        for col in (label, *columns):
            table.add_column(col, justify="left" if col == label else "right")
        for name, row in rows.items():
            cells = [str(row[c]) if isinstance(row[c], int) else f"{row[c]:.3f}" for c in columns]
            table.add_row(name, *cells)
        tables.append(table)
    return tables


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    """Train a model (``vt.train``); the last line printed is the run directory."""
    from visiontrain.api import Run, refuse_tune_keys
    from visiontrain.config import load_config, split_items
    from visiontrain.rundir import disk_use

    path, overrides = split_items(args.items)
    refuse_tune_keys(overrides)
    if args.from_file:
        from visiontrain.tools.tune import config_from_best

        cfg = config_from_best(path, overrides, args.from_file)
    else:
        cfg = load_config(path, overrides)
    run = Run(cfg, console=console)
    if args.check:
        run.check()
        console.print("config OK: data, model, optimizer and schedule build.", highlight=False)
        return EXIT_OK
    result = run.fit()
    if result.rank != 0:
        return EXIT_OK
    summary = result.summary
    for split in ("val", "test"):
        for table in metric_tables(summary["metrics"].get(split) or {}, split):
            console.print(table)
    if summary["skipped_files"]["count"]:
        console.print(
            f"skipped {summary['skipped_files']['count']} unreadable files "
            "(listed in summary.json)",
            highlight=False,
        )
    used = disk_use(result.run_dir)
    console.print(f"run directory: {used / 2**20:.1f} MiB on disk", highlight=False)
    print(result.run_dir, flush=True)
    return EXIT_OK


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    """Profile the configured training's steps (``vt.profile``); the last line is the folder."""
    from visiontrain.api import profile
    from visiontrain.config import split_items

    path, overrides = split_items(args.items)
    # Unset options keep vt.profile's defaults, which the help text quotes.
    counts = {k: v for k, v in (("warmup", args.warmup), ("steps", args.steps)) if v is not None}
    result = profile(path, *overrides, out=args.out, console=console, **counts)
    print(result.folder, flush=True)
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace, console: Console) -> int:
    """Print the fully resolved config: every key, source defaults filled in."""
    from visiontrain.config import load_config, split_items
    from visiontrain.data import build_data

    path, overrides = split_items(args.items)
    cfg = load_config(path, overrides)
    # The data source resolves what the config leaves to it (the image size).
    cfg.data.image_size = build_data(cfg.data, cfg.task).image_size
    print(cfg.to_yaml(), end="", flush=True)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    """Evaluate a checkpoint on a split of its data (``vt.evaluate``)."""
    from visiontrain.api import evaluate

    metrics = evaluate(args.target, args.split, *args.overrides, coco_results=args.coco_results)
    if args.coco_results:
        console.print(f"COCO results JSON written to {args.coco_results}", highlight=False)
    if args.format == "json":
        print(json.dumps(metrics, indent=2))
    else:
        for table in metric_tables(metrics, args.split):
            console.print(table)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    """Predict classes, values, boxes or masks for image files or folders."""
    from visiontrain.data.images import IMAGE_EXTENSIONS
    from visiontrain.predict import draw_boxes, load_for_predict, predict_files, write_masks

    paths: list[Path] = []
    for item in args.images:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.exists():
            paths.append(p)
        else:
            raise UserError(f"{p} does not exist; pass image files or folders of images.")
    if not paths:
        raise UserError("no images found in the given paths.")
    # A run, a checkpoint, or an exported .pt2/.onnx with its model.json: the same rows.
    loaded = load_for_predict(args.target)
    task = loaded.task
    if task != "classification" and args.top_k != 1:
        raise UserError(f"--top-k ranks classes; {args.target} is a {task} model. Drop --top-k.")
    if task != "detection" and (args.score_threshold is not None or args.draw):
        raise UserError(
            f"--score-threshold and --draw apply to detection; {args.target} is a {task} "
            "model. Drop them."
        )
    rows = predict_files(loaded, paths, args.top_k, args.score_threshold, on_error=args.on_error)
    for row in rows:
        if "error" in row:
            print(f"skipped {row['file']}: {row['error']}", file=sys.stderr, flush=True)
    out_dir = Path(args.out)
    if task == "segmentation":
        write_masks(rows, out_dir)
        console.print(f"masks written to {out_dir}/ (PNG, class index per pixel)")
    if args.draw:
        draw_boxes(rows, out_dir, loaded.class_names)
        console.print(f"images with boxes written to {out_dir}/")
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    flat = _flat_rows([row for row in rows if "error" not in row])
    if not flat:
        console.print("no detections above the score threshold")
        return EXIT_OK
    if args.top_k > 1:
        # The ranked alternatives as one column: "b 80.1%, a 15.0%, c 4.9%".
        for r in flat:
            r["top"] = ", ".join(f"{c['class']} {c['probability']:.1%}" for c in r["top"])
    columns = [c for c in flat[0] if c != "top" or args.top_k > 1]
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r in flat)
    else:
        table = Table()
        for col in columns:
            table.add_column(
                col, justify="left" if col in ("file", "prediction", "labels") else "right"
            )
        for r in flat:
            table.add_row(
                *(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns)
            )
        console.print(table)
    threshold = loaded.task_state.get("threshold")
    if threshold is not None and args.format == "table":
        # The fixed default needs no word; a threshold tuned on val at training does.
        how = "the fixed default" if threshold == 0.5 else "tuned on val at training"
        console.print(f"decision threshold {threshold:.4g} ({how})", highlight=False)
    thresholds = loaded.task_state.get("thresholds")
    if thresholds is not None and args.format == "table":
        pairs = ", ".join(
            f"{c} {t:.4g}" for c, t in zip(loaded.class_names, thresholds, strict=True)
        )
        console.print(f"decision thresholds per class: {pairs}", highlight=False)
    return EXIT_OK


def _flat_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per detection (detection), per image otherwise."""
    flat = []
    for row in rows:
        if "detections" in row:
            for det in row["detections"]:
                x1, y1, x2, y2 = det["box"]
                flat.append(
                    {
                        "file": row["file"],
                        "class": det["class"],
                        "category_id": det["category_id"],
                        "score": det["score"],
                        "x1": x1,
                        "y1": y1,
                        "x2": x2,
                        "y2": y2,
                    }
                )
        elif "classes" in row:
            shares = ", ".join(f"{k} {v:.1%}" for k, v in row["classes"].items())
            flat.append({"file": row["file"], "mask": row["mask"], "classes": shares})
        elif "labels" in row:
            # Multilabel: the set in one column, then one probability column per class.
            flat.append(
                {"file": row["file"], "labels": " ".join(row["labels"]), **row["probabilities"]}
            )
        else:
            flat.append(row)
    return flat


# The verbs whose parsers live with their tools: imported only when that verb runs, so
# `visiontrain --help`, `--version` and the light verbs start without torch.
TOOL_VERBS = {
    "compare": ("visiontrain.tools.compare", "compare the metrics of finished runs"),
    "tune": ("visiontrain.tools.tune", "search hyperparameters with Optuna (small budgets)"),
    "lr-find": ("visiontrain.tools.lr_find", "LR range test: suggest a learning rate for a config"),
    "doctor": (
        "visiontrain.tools.doctor",
        "preflight: check data, model, training step, eval path, loader and precision",
    ),
    "bench": ("visiontrain.tools.bench", "measure the data loader or mixed precision for a config"),
    "explain": (
        "visiontrain.tools.explain",
        "small experiments behind training defaults (init, norm)",
    ),
    "report": ("visiontrain.report", "(re)build a run's report.html and plots/"),
    "export": (
        "visiontrain.export.writer",
        "export a run's best weights to .pt2 or .onnx, verified",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with one sub-command per verb.

    Args:
        only: Build the full parser of this tool verb only (the others are listed by
            name and summary); None builds every verb's parser.
    """
    parser = argparse.ArgumentParser(
        prog="visiontrain",
        description="Train vision models fast, correctly and reproducibly.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"visiontrain {__version__}")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (repeatable): a module that registers your models, data "
        "sources or losses (vt.register_model ...), so runs that use them load here",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the embedded defects data)",
        description="Train a model. With no arguments, trains the embedded `defects` data. "
        "The last line printed is the run directory.",
        epilog=EPILOG,
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate config, data and model; do not train (no run folder is written; "
        "generated data is cached as a run would)",
    )
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="apply the overrides of a `visiontrain tune` best.json on top of CONFIG "
        "(key=value on the command line still win)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "config",
        help="show the fully resolved config",
        description="`visiontrain config show [CONFIG.yaml] [key=value ...]` prints the config "
        "a run would use: every key, with the data source's defaults filled in. key=null "
        "unsets a key (back to its default), e.g. data.image_size=null.",
    )
    config_sub = p.add_subparsers(dest="config_verb", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser(
        "eval",
        help="evaluate a run or checkpoint on a split",
        description="Evaluate a run directory (its best.pt) or a checkpoint on a data split. "
        "key=value overrides change the data (e.g. data.root=PATH).",
    )
    p.add_argument("target", metavar="RUN_OR_CKPT")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument(
        "--coco-results",
        metavar="FILE",
        help="detection: also write the split's detections as a COCO results JSON",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="predict classes, values, boxes or masks for image files",
        description="Predict with a run directory, a checkpoint, or an exported model "
        "(model.pt2 / model.onnx with its model.json beside it): the class of each image "
        "(with the threshold chosen at training), regression values, detected boxes, or "
        "segmentation masks (written as PNGs of class indices to --out).",
    )
    p.add_argument("target", metavar="RUN_CKPT_OR_EXPORT")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--top-k", type=int, default=1, help="classification: list the k best")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="detection: keep boxes scoring at least this (default 0.5; NMS is the model's)",
    )
    p.add_argument(
        "--draw", action="store_true", help="detection: write the images with boxes to --out"
    )
    p.add_argument(
        "--out", default="predictions", help="folder for masks and drawn images (predictions/)"
    )
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="an unreadable image: stop (raise, default) or report it and predict the rest",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "profile",
        help="where a training step's time goes: loader, copy, forward, backward, optimizer",
        description="Train the config for --warmup updates, then --steps updates under "
        "torch.profiler, through the trainer's own step, and print where a step's time goes "
        "(waiting for the loader, host-to-device copy, forward, backward, optimizer, logging; "
        "all-reduce under DDP), the top operators, samples/s, on CUDA peak memory and model "
        "FLOPs utilisation, and advice tied to the numbers. Writes trace.json (Chrome trace), "
        "tb/ (TensorBoard profile) and profile.json to --out (default run.dir/run.name, else "
        "run.dir/profile-<data>-<timestamp>); the last line printed is that folder. "
        "train.profile_steps=a:b profiles a window of a `visiontrain train` run instead.",
        epilog="Example: visiontrain profile configs/defects.yaml data.num_workers=2 --steps 20",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--warmup", type=int, default=None, help="updates before the measured ones (default 3)"
    )
    p.add_argument("--steps", type=int, default=None, help="updates measured (default 10)")
    p.add_argument("--out", default=None, help="output folder (new or empty)")
    p.set_defaults(func=cmd_profile)
    for verb, (module, summary) in TOOL_VERBS.items():
        if only is None or only == verb:
            importlib.import_module(module).add_parser(sub)
        else:
            # Listed for --help without importing the tool (and torch) behind it.
            sub.add_parser(verb, help=summary)
    return parser


def _verb_of(argv: list[str]) -> str | None:
    """The verb of a command line (the first word that is not an option or its value)."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--import":
            i += 2
            continue
        if not word.startswith("-"):
            return word
        i += 1
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``visiontrain`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_verb_of(argv) or "")
    args = parser.parse_args(argv)
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(
                f"error: --import {module}: {exc}. Pass an importable module (on PYTHONPATH "
                "or installed), e.g. --import mypackage.models.",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_BAD_INPUT
    if not getattr(args, "verb", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    # soft_wrap: log lines stay whole when output goes to a file or a CI log.
    console = Console(highlight=False, soft_wrap=True)
    try:
        if args.verb != "train":
            from visiontrain.engine.distributed import refuse_distributed

            refuse_distributed(args.verb)
        return args.func(args, console)
    except UserError as exc:
        print(f"error: {clean_message(exc)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return exc.exit_code
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted before a checkpoint could be saved", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    except Exception:  # anything unexpected: show the traceback, exit 1
        traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
