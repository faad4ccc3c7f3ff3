"""Small experiments that show why a training default is what it is.

* ``visiontrain explain init``: the activation scale through a deep ReLU MLP under
  Xavier (Glorot & Bengio 2010) and Kaiming (He et al. 2015) initialisation. Xavier keeps
  the variance of a linear layer; ReLU zeroes half of it, so the scale halves at every
  layer. Kaiming's gain of sqrt(2) puts that half back.
* ``visiontrain explain norm``: BatchNorm normalises each channel over the batch, so a
  sample's output depends on the other samples; LayerNorm normalises each sample over its
  own features and does not.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from visiontrain.errors import EXIT_OK
from visiontrain.io import atomic_write, atomic_write_json

INIT_DEPTH = 50
INIT_WIDTH = 256
INIT_BATCH = 512
INIT_REPORT_LAYERS = (1, 10, 20, 30, 40, 50)
NORM_BATCH_SIZES = (2, 8, 32)
NORM_CHANNELS = 8
NORM_SPATIAL = 4


def explain_init(seed: int = 0) -> dict[str, Any]:
    """Activation std after each layer of a 50-layer ReLU MLP, per init scheme.

    Both schemes get the same input (512 x 256 standard normal) and bias-free layers, so
    the only difference is the weight scale: Xavier ``2 / (fan_in + fan_out)`` against
    Kaiming ``2 / fan_in`` (fan_in mode, ReLU gain).

    Returns:
        ``{"std": {scheme: [std after layer 1..50]}, "ratio_50_to_1": {scheme: float},
        "input_std": float, ...}``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(INIT_BATCH, INIT_WIDTH, generator=gen)
    schemes = {
        "xavier": lambda w: nn.init.xavier_normal_(w, generator=gen),
        "kaiming": lambda w: nn.init.kaiming_normal_(
            w, mode="fan_in", nonlinearity="relu", generator=gen
        ),
    }
    stds: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, init in schemes.items():
            h, trace = x, []
            for _ in range(INIT_DEPTH):
                w = torch.empty(INIT_WIDTH, INIT_WIDTH)
                init(w)
                h = torch.relu(h @ w.T)
                trace.append(h.std().item())
            stds[name] = trace
    return {
        "depth": INIT_DEPTH,
        "width": INIT_WIDTH,
        "batch": INIT_BATCH,
        "input_std": x.std().item(),
        "std": stds,
        "ratio_50_to_1": {k: v[-1] / v[0] for k, v in stds.items()},
    }


def init_plot(result: dict[str, Any]) -> bytes:
    """PNG: activation std per layer (log scale) for each scheme."""
    # The object API with the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    layers = range(1, result["depth"] + 1)
    for name, trace in result["std"].items():
        ax.semilogy(layers, trace, marker=".", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("activation std")
    ax.set_title(f"{result['depth']}-layer ReLU MLP, width {result['width']}")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _norm_stats(out: torch.Tensor) -> dict[str, float]:
    """How far a normalised (N, C, H, W) batch is from zero mean / unit std per axis."""
    per_sample = out.flatten(1)
    per_channel = out.transpose(0, 1).flatten(1)
    return {
        "sample_mean_max_abs": per_sample.mean(1).abs().max().item(),
        "sample_std_max_dev": (per_sample.std(1, unbiased=False) - 1).abs().max().item(),
        "channel_mean_max_abs": per_channel.mean(1).abs().max().item(),
        "channel_std_max_dev": (per_channel.std(1, unbiased=False) - 1).abs().max().item(),
    }


def explain_norm(seed: int = 0) -> dict[str, Any]:
    """BatchNorm vs LayerNorm on random conv features at batch sizes 2, 8 and 32.

    The features have a different offset and scale per channel, as conv outputs do. For
    each batch size, sample 0 is normalised twice, with two different sets of companions;
    ``sample0_change`` is the largest change of its output between the two batches. Both
    layers are in training mode with their default identity affine.

    Returns:
        ``{"rows": [{"norm", "batch_size", statistics..., "sample0_change"}, ...]}``.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (NORM_CHANNELS, NORM_SPATIAL, NORM_SPATIAL)
    offset = torch.randn(1, NORM_CHANNELS, 1, 1, generator=gen) * 3
    scale = torch.rand(1, NORM_CHANNELS, 1, 1, generator=gen) * 4 + 0.5

    def features(n: int) -> torch.Tensor:
        return torch.randn(n, *shape, generator=gen) * scale + offset

    fixed = features(1)
    rows = []
    with torch.no_grad():
        for n in NORM_BATCH_SIZES:
            batch_a = torch.cat([fixed, features(n - 1)])
            batch_b = torch.cat([fixed, features(n - 1)])
            for name, layer in (
                ("batchnorm", nn.BatchNorm2d(NORM_CHANNELS)),
                ("layernorm", nn.LayerNorm(list(shape))),
            ):
                layer.train()
                out_a, out_b = layer(batch_a), layer(batch_b)
                rows.append(
                    {
                        "norm": name,
                        "batch_size": n,
                        **_norm_stats(out_a),
                        "sample0_change": (out_a[0] - out_b[0]).abs().max().item(),
                    }
                )
    return {"channels": NORM_CHANNELS, "spatial": NORM_SPATIAL, "rows": rows}


def norm_findings(result: dict[str, Any]) -> list[str]:
    """One sentence per finding, with the numbers from ``result``."""
    bn = [r for r in result["rows"] if r["norm"] == "batchnorm"]
    ln = [r for r in result["rows"] if r["norm"] == "layernorm"]
    worst = max(bn, key=lambda r: r["sample0_change"])
    ln_change = max(r["sample0_change"] for r in ln)
    bn_channel = max(r["channel_mean_max_abs"] for r in bn)
    ln_sample = max(r["sample_mean_max_abs"] for r in ln)
    return [
        "BatchNorm makes every channel zero-mean, unit-std over the batch (largest channel "
        f"mean {bn_channel:.1e}); LayerNorm does that for every sample instead (largest "
        f"sample mean {ln_sample:.1e}).",
        "BatchNorm's output for a fixed sample changes when the rest of the batch changes "
        f"(up to {worst['sample0_change']:.3f} at batch {worst['batch_size']}, and "
        f"{bn[-1]['sample0_change']:.3f} at batch {bn[-1]['batch_size']}): small batches "
        "make its statistics noisy, and eval mode's running averages differ from them.",
        (
            "LayerNorm's output for a fixed sample is exactly the same whatever the batch, "
            "so it behaves the same at batch size 1, in training and at inference."
            if ln_change == 0
            else f"LayerNorm's output for a fixed sample moves by at most {ln_change:.1e} "
            "with the batch (rounding only): it normalises each sample on its own."
        ),
    ]


def cmd_explain(args: argparse.Namespace, console: Console) -> int:
    """``visiontrain explain TOPIC``: run the experiment, print table and text, write files."""
    folder = Path(args.out or f"runs/explain-{args.topic}").expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if args.topic == "init":
        result = explain_init()
        table = Table(
            title=f"activation std, {INIT_DEPTH}-layer ReLU MLP (input std "
            f"{result['input_std']:.3f})"
        )
        table.add_column("init", justify="left")
        for layer in INIT_REPORT_LAYERS:
            table.add_column(f"layer {layer}", justify="right")
        for name, trace in result["std"].items():
            table.add_row(name, *(f"{trace[i - 1]:.3g}" for i in INIT_REPORT_LAYERS))
        console.print(table)
        ratio = result["ratio_50_to_1"]
        text = [
            f"Xavier vanishes: its std at layer {INIT_DEPTH} is {ratio['xavier']:.1e} of layer "
            "1's, because each ReLU layer halves the variance that Xavier's scale keeps.",
            f"Kaiming holds: its std at layer {INIT_DEPTH} is {ratio['kaiming']:.2f} times layer "
            "1's; the gain sqrt(2) restores what ReLU removes.",
        ]
        result["findings"] = text
        atomic_write_json(folder / "explain_init.json", result)
        png = init_plot(result)
        atomic_write(folder / "explain_init.png", lambda fh: fh.write(png))
    else:
        result = explain_norm()
        table = Table(
            title="BatchNorm vs LayerNorm on random conv features (training mode; largest "
            "deviation over samples or channels; sample 0's change with its companions)"
        )
        columns = (
            ("norm", "norm"),
            ("batch", "batch_size"),
            ("sample |mean|", "sample_mean_max_abs"),
            ("sample |std-1|", "sample_std_max_dev"),
            ("channel |mean|", "channel_mean_max_abs"),
            ("channel |std-1|", "channel_std_max_dev"),
            ("sample 0 change", "sample0_change"),
        )
        for title, _ in columns:
            table.add_column(title, justify="left" if title == "norm" else "right")
        for r in result["rows"]:
            table.add_row(
                *(str(r[k]) if isinstance(r[k], str | int) else f"{r[k]:.2e}" for _, k in columns)
            )
        console.print(table)
        text = norm_findings(result)
        result["findings"] = text
        atomic_write_json(folder / "explain_norm.json", result)
    for line in text:
        console.print(line, highlight=False)
    print(folder, flush=True)
    return EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``explain`` sub-command to the CLI's sub-parsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``explain`` parser.
    """
    p = sub.add_parser(
        "explain",
        help="small experiments behind training defaults (init, norm)",
        description="init: activation std through a 50-layer ReLU MLP (width 256) under "
        "Xavier and Kaiming init (table, explain_init.json, explain_init.png). norm: "
        "BatchNorm vs LayerNorm statistics at batch sizes 2, 8, 32 and whether a sample's "
        "output depends on the rest of the batch (table, explain_norm.json). The last line "
        "printed is the output folder.",
    )
    p.add_argument("topic", choices=("init", "norm"))
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/explain-TOPIC)")
    p.set_defaults(func=cmd_explain)
    return p
