"""``python -m vitkernels plot DIR [--bench FILE.json]``: the figures of a sweep and of a benchmark.

From ``DIR/sweep.json`` (written by ``python -m vitkernels sweep``):

- ``DIR/compute_vs_accuracy.{png,svg}``: test accuracy against total training compute on a log axis, as the
  paper's "performance versus pre-training compute" figure: one colour per model size, one marker per patch
  size, the runs of one architecture at different training lengths joined by a thin line, every point
  labelled, the Pareto frontier (the best accuracy reached for at most that compute) drawn dashed.
- ``DIR/accuracy_vs_wallclock.{png,svg}``: test accuracy against training wall-clock time, one colour per
  backend, which shows what the kernels buy in time rather than in FLOPs.

With ``--bench FILE.json`` (rows with provider, mode, img_per_s, speedup_vs_eager, skipped, as written by
``python -m vitkernels bench``): ``DIR/throughput.{png,svg}``, training throughput by provider as bars labelled
with img/s and the speed-up over eager, one panel per mode, skipped providers listed with their reason.

Every figure carries a caption with the dataset, device, backend and date. matplotlib's Agg backend: no display.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from vitkernels.experiments.cli import ArgumentParser

# (scale, unit) for total compute, chosen so that the smallest point is at least 1 of the unit.
FLOP_UNITS = ((1e18, "EFLOPs"), (1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1.0, "FLOPs"))
_EXPONENT = {1e18: "10¹⁸", 1e15: "10¹⁵", 1e12: "10¹²", 1e9: "10⁹", 1e6: "10⁶", 1.0: "1"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


class PlotError(ValueError):
    """Nothing to plot, or an input file that cannot be read; the message says which."""


def flop_unit(values) -> tuple[float, str]:
    """The (scale, name) of the largest unit in which the smallest positive value is at least 1."""
    positive = [v for v in values if v and v > 0]
    smallest = min(positive) if positive else 1.0
    for scale, name in FLOP_UNITS:
        if smallest >= scale:
            return scale, name
    return FLOP_UNITS[-1]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) that no other point beats: none cheaper-or-equal with a higher value.

    Returned in order of increasing cost, so they draw as the frontier line.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def load_sweep(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(meta, rows) of a sweep.json (an object with "rows", or a bare list of rows)."""
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.json"
    return _load_rows(path, "", ("rows",), hint=" (run `python -m vitkernels sweep` first)")


def finished(rows: list[dict]) -> list[dict]:
    """The rows of runs that finished with a test accuracy and a positive training compute."""
    out = []
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        try:
            if float(row["test_accuracy"]) >= 0 and float(row["train_flops"]) > 0:
                out.append(row)
        except (KeyError, TypeError, ValueError):
            continue
    return out


def size_label(row: dict) -> str:
    """The model size of a run, e.g. "D64·L4" or "vit_tiny" (a named model without patch/resolution)."""
    if row.get("model"):
        return str(row["model"]).split("_patch")[0]
    return f"D{row.get('embed_dim')}·L{row.get('depth')}"


def length_label(row: dict) -> str:
    """The training length the run was given: "3 ep" or "500 st"."""
    options = row.get("options")
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError:
            options = None
    options = options if isinstance(options, dict) else {}
    if "steps" in options or ("epochs" not in options and row.get("epochs") in (None, "")):
        steps = options.get("steps", row.get("steps"))
        return f"{steps} st" if steps not in (None, "") else ""
    return f"{float(options.get('epochs', row['epochs'])):.3g} ep"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _join(values) -> str:
    values = sorted({str(v) for v in values if v not in (None, "")})
    return ", ".join(values) if values else "unknown"


def _caption(meta: dict, rows: list[dict]) -> str:
    date = str(meta.get("updated") or meta.get("started") or "")[:10] or datetime.now(timezone.utc).date().isoformat()
    parts = [f"dataset: {meta['dataset']}"] if meta.get("dataset") else []
    parts += [f"{len(rows)} runs", f"device: {_join(r.get('device') for r in rows)}",
              f"backend: {_join(r.get('backend') for r in rows)}", date]
    return "   ·   ".join(parts)


def _log_x(ax) -> None:
    """A log x axis with tick labels as plain numbers (3, 20, 500) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else ""))


def _accuracy(row: dict, error: bool) -> float:
    acc = 100.0 * float(row["test_accuracy"])
    return 100.0 - acc if error else acc


def plot_compute_vs_accuracy(meta: dict, rows: list[dict], *, error: bool = False):
    """The paper-style figure: accuracy (or error) in % against total training compute. Returns the Figure."""
    rows = finished(rows)
    if not rows:
        raise PlotError("no finished runs with test_accuracy and train_flops to plot")
    plt = _pyplot()
    scale, unit = flop_unit(float(r["train_flops"]) for r in rows)
    sizes = sorted({size_label(r) for r in rows}, key=lambda s: min(float(r.get("params") or 0) for r in rows
                                                                       if size_label(r) == s))
    patches = sorted({r.get("patch_size") for r in rows}, key=lambda p: (p is None, p or 0))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sizes)}
    markers = {p: _MARKERS[i % len(_MARKERS)] for i, p in enumerate(patches)}

    fig, ax = plt.subplots(figsize=(8.5, 5.8), layout="constrained")
    for size in sizes:
        for patch in patches:
            group = sorted((r for r in rows if size_label(r) == size and r.get("patch_size") == patch),
                           key=lambda r: float(r["train_flops"]))
            if not group:
                continue
            xs = [float(r["train_flops"]) / scale for r in group]
            ys = [_accuracy(r, error) for r in group]
            ax.plot(xs, ys, "-", color=colours[size], alpha=0.35, linewidth=1)
            ax.scatter(xs, ys, color=colours[size], marker=markers[patch], s=55, zorder=3, edgecolor="white",
                       linewidth=0.6)
            for x, y, r in zip(xs, ys, group):
                ax.annotate(f"{size}/{patch} {length_label(r)}".strip(), (x, y), textcoords="offset points",
                            xytext=(5, 4), fontsize=7, color="0.25")

    points = [(float(r["train_flops"]) / scale, _accuracy(r, error) * (-1 if error else 1)) for r in rows]
    front = pareto_front(points)
    fx = [points[i][0] for i in front]
    fy = [_accuracy(rows[i], error) for i in front]
    ax.scatter(fx, fy, facecolor="none", edgecolor="black", s=120, linewidth=1, zorder=4)
    # The best result reached for at most x compute: a staircase, held level to the most expensive run.
    last_x = max(p[0] for p in points)
    ax.plot(fx + ([last_x] if last_x > fx[-1] else []), fy + ([fy[-1]] if last_x > fx[-1] else []), "--",
            color="black", linewidth=1.2, drawstyle="steps-post", zorder=2, label="Pareto frontier")

    # Two legends: colour = model size (with parameter count), marker = patch size.
    from matplotlib.lines import Line2D

    def params_of(size):
        counts = [float(r["params"]) for r in rows if size_label(r) == size and r.get("params")]
        return f" ({counts[0] / 1e6:.2g}M params)" if counts else ""

    size_handles = [Line2D([], [], color=colours[s], marker="o", linestyle="", label=s + params_of(s)) for s in sizes]
    patch_handles = [Line2D([], [], color="0.3", marker=markers[p], linestyle="", label=f"patch {p}") for p in patches]
    patch_handles.append(Line2D([], [], color="black", linestyle="--", label="Pareto frontier"))
    first = ax.legend(handles=size_handles, title="model size", fontsize=8, title_fontsize=8,
                      loc="lower right" if not error else "upper right")
    ax.add_artist(first)
    ax.legend(handles=patch_handles, fontsize=8, loc="upper left" if not error else "lower left")

    _log_x(ax)
    ax.set_xlabel(f"total training compute [{unit} = {_EXPONENT[scale]} FLOPs]  (log scale)")
    ax.set_ylabel("test top-1 error [%]" if error else "test top-1 accuracy [%]")
    ax.set_title("Accuracy vs training compute" if not error else "Error vs training compute")
    ax.grid(True, which="both", alpha=0.25)
    fig.text(0.5, -0.01, _caption(meta, rows), ha="center", va="top", fontsize=8, color="0.35")
    return fig


def plot_accuracy_vs_wallclock(meta: dict, rows: list[dict], *, error: bool = False):
    """Accuracy (or error) against training wall-clock seconds, one colour per backend. Returns the Figure."""
    rows = [r for r in finished(rows) if r.get("wall_s") not in (None, "") and float(r["wall_s"]) > 0]
    if not rows:
        raise PlotError("no finished runs with test_accuracy and wall_s to plot")
    plt = _pyplot()
    backends = sorted({str(r.get("backend") or "unknown") for r in rows})
    patches = sorted({r.get("patch_size") for r in rows}, key=lambda p: (p is None, p or 0))
    markers = {p: _MARKERS[i % len(_MARKERS)] for i, p in enumerate(patches)}
    fig, ax = plt.subplots(figsize=(8.5, 5.8), layout="constrained")
    for i, backend in enumerate(backends):
        colour = plt.get_cmap("tab10")(i % 10)
        for patch in patches:
            group = [r for r in rows if str(r.get("backend") or "unknown") == backend and r.get("patch_size") == patch]
            if not group:
                continue
            xs = [float(r["wall_s"]) for r in group]
            ys = [_accuracy(r, error) for r in group]
            ax.scatter(xs, ys, color=colour, marker=markers[patch], s=55, zorder=3, edgecolor="white", linewidth=0.6,
                       label=f"{backend}, patch {patch}")
            for x, y, r in zip(xs, ys, group):
                ax.annotate(f"{size_label(r)}/{patch} {length_label(r)}".strip(), (x, y), textcoords="offset points",
                            xytext=(5, 4), fontsize=7, color="0.25")
    _log_x(ax)
    ax.set_xlabel("training wall-clock time [s]  (log scale)")
    ax.set_ylabel("test top-1 error [%]" if error else "test top-1 accuracy [%]")
    ax.set_title("Accuracy vs training wall-clock, per backend")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.text(0.5, -0.01, _caption(meta, rows), ha="center", va="top", fontsize=8, color="0.35")
    return fig


def load_bench(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(meta, rows) of a bench JSON: a list of rows, or an object holding them under "rows" or "results"."""
    return _load_rows(Path(path), "bench file ", ("rows", "results"))


def _load_rows(path: Path, what: str, keys: tuple[str, ...], hint: str = "") -> tuple[dict, list[dict]]:
    """(meta, rows) of a JSON file holding a list of rows, or an object with them under one of ``keys``;
    ``what`` names the file in the errors, ``hint`` ends the can't-read one."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PlotError(f"cannot read {what}{path}: {exc.strerror or exc}{hint}") from None
    except json.JSONDecodeError as exc:
        raise PlotError(f"{what}{path} is not valid JSON: {exc}") from None
    if isinstance(data, list):
        return {}, data
    if isinstance(data, dict):
        for key in keys:
            if isinstance(data.get(key), list):
                return {k: v for k, v in data.items() if k != key}, data[key]
    raise PlotError(f"{what}{path}: expected a list of rows or an object with {' or '.join(map(repr, keys))}")


def _skip_reason(row: dict) -> str | None:
    skipped = row.get("skipped")
    if not skipped:
        return None
    return skipped if isinstance(skipped, str) else str(row.get("reason") or row.get("error") or "skipped")


def plot_throughput(meta: dict, rows: list[dict]):
    """Training throughput by provider: one bar per provider, labelled img/s and speed-up; one panel per mode."""
    rows = [r for r in rows if isinstance(r, dict) and r.get("provider")]
    if not rows:
        raise PlotError("the bench file has no rows with a provider")
    plt = _pyplot()
    modes = list(dict.fromkeys(str(r.get("mode") or "") for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.0, 4.2 * len(modes)), 5.0), layout="constrained",
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        group = [r for r in rows if str(r.get("mode") or "") == mode]
        ran = [r for r in group if not _skip_reason(r) and r.get("img_per_s") not in (None, "")]
        skipped = [r for r in group if _skip_reason(r)]
        names = [str(r["provider"]) for r in ran]
        values = [float(r["img_per_s"]) for r in ran]
        colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(ran))]
        bars = ax.bar(range(len(ran)), values, color=colours)
        for bar, r in zip(bars, ran):
            label = f"{float(r['img_per_s']):,.0f} img/s"
            if r.get("speedup_vs_eager") not in (None, ""):
                label += f"\n{float(r['speedup_vs_eager']):.2f}×"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), textcoords="offset points",
                        xytext=(0, 3), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(ran)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("training throughput [img/s]")
        ax.set_ylim(0, (max(values) if values else 1) * 1.25)
        ax.set_title(f"mode: {mode}" if mode else "training throughput", fontsize=10)
        ax.grid(True, axis="y", alpha=0.25)
        if skipped:
            note = "skipped: " + "; ".join(f"{r['provider']} ({_skip_reason(r)})" for r in skipped)
            ax.text(0.01, 0.98, _wrap(note, 60), transform=ax.transAxes, ha="left", va="top", fontsize=7,
                    color="0.4")
    fig.suptitle("Training throughput by provider (label: speed-up vs eager)", fontsize=11)
    date = str(meta.get("date") or meta.get("created") or "")[:10] or datetime.now(timezone.utc).date().isoformat()
    device = meta.get("device") or _join(r.get("device") for r in rows)
    model = meta.get("model") or _join(r.get("model") for r in rows)
    fig.text(0.5, -0.01, f"model: {model}   ·   device: {device}   ·   {date}", ha="center", va="top", fontsize=8,
             color="0.35")
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def save(fig, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem``.png (150 dpi) and ``stem``.svg (no timestamp: reruns give identical files); close."""
    plt = _pyplot()
    paths = [Path(f"{stem}.png"), Path(f"{stem}.svg")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    parser = ArgumentParser(prog="vitkernels plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="sweep output folder (holds sweep.json); the figures are written there")
    parser.add_argument("--bench", help="bench JSON file: also plot training throughput by provider")
    parser.add_argument("--error", action="store_true", help="plot top-1 error instead of accuracy")
    args = parser.parse_args(argv)
    out = Path(args.dir)
    written: list[Path] = []
    try:
        has_sweep = (out / "sweep.json").exists()
        if has_sweep or not args.bench:
            meta, rows = load_sweep(out)
            written += save(plot_compute_vs_accuracy(meta, rows, error=args.error), out / "compute_vs_accuracy")
            try:
                written += save(plot_accuracy_vs_wallclock(meta, rows, error=args.error), out / "accuracy_vs_wallclock")
            except PlotError as exc:
                print(f"vitkernels plot: no wall-clock figure: {exc}", file=sys.stderr)
        if args.bench:
            out.mkdir(parents=True, exist_ok=True)
            written += save(plot_throughput(*load_bench(args.bench)), out / "throughput")
    except PlotError as exc:
        print(f"vitkernels plot: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
