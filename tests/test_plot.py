"""`python -m vitkernels plot`: figures from a synthetic sweep.json and a bench JSON; the helpers behind them."""

import json
import struct

import pytest

from optional import need

from vitkernels.experiments import plot
from vitkernels.experiments.plot import PlotError, flop_unit, pareto_front

need("matplotlib")  # every figure test draws with it

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) of a PNG file, after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def synthetic_sweep():
    rows = []
    for size, (dim, depth, params) in {"small": (32, 2, 3e4), "big": (64, 4, 2e5)}.items():
        for patch, tokens in ((7, 17), (4, 50)):
            for epochs in (1, 3):
                flops = 6 * params * tokens * 4000 * epochs
                acc = 0.6 + 0.05 * epochs + (0.05 if patch == 4 else 0) + (0.06 if size == "big" else 0)
                rows.append({"run_id": f"{size}-p{patch}-e{epochs}", "status": "ok", "model": None,
                             "embed_dim": dim, "depth": depth, "num_heads": 2, "patch_size": patch,
                             "epochs": epochs, "params": params, "train_flops": flops, "test_accuracy": acc,
                             "wall_s": flops / 5e10, "backend": "torch" if patch == 7 else "triton",
                             "device": "cpu (x86_64, 2 cores)", "status_note": ""})
    rows.append({"run_id": "broken", "status": "failed", "error": "boom", "embed_dim": 8, "depth": 1,
                 "patch_size": 4, "test_accuracy": None, "train_flops": None})
    return {"dataset": "mnist5k", "started": "2026-11-25T01:00:00Z", "updated": "2026-11-25T01:10:00Z",
            "rows": rows}


BENCH = {"device": "NVIDIA H100 80GB HBM3", "model": "vit_base_patch16_224", "rows": [
    {"provider": "timm", "mode": "eager", "img_per_s": 1000.0, "speedup_vs_eager": 1.0, "skipped": False},
    {"provider": "timm", "mode": "compile", "img_per_s": 1300.0, "speedup_vs_eager": 1.3, "skipped": False},
    {"provider": "vitkernels-triton", "mode": "eager", "img_per_s": 1500.0, "speedup_vs_eager": 1.5,
     "skipped": False},
    {"provider": "vitkernels-cuda", "mode": "eager", "img_per_s": None, "speedup_vs_eager": None,
     "skipped": "extension not built"},
]}


def test_flop_unit():
    assert flop_unit([3e14, 9e15]) == (1e12, "TFLOPs")
    assert flop_unit([2e18, 5e19]) == (1e18, "EFLOPs")
    assert flop_unit([1.5e15]) == (1e15, "PFLOPs")
    assert flop_unit([5e9, 1e12]) == (1e9, "GFLOPs")
    assert flop_unit([0, None, 12.0]) == (1.0, "FLOPs")


def test_pareto_front():
    # (cost, value): 1 and 3 are beaten by a cheaper better point; ties in cost keep the better one.
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.7), (4.0, 0.7), (5.0, 0.9), (1.0, 0.3)]
    assert pareto_front(points) == [0, 2, 4]
    assert pareto_front([]) == []


def test_sweep_figures(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text(json.dumps(synthetic_sweep()))
    assert plot.main([str(tmp_path)]) == 0
    for stem in ("compute_vs_accuracy", "accuracy_vs_wallclock"):
        width, height = png_size(tmp_path / f"{stem}.png")
        assert width > 600 and height > 400, (width, height)
        assert (tmp_path / f"{stem}.png").stat().st_size > 20_000
        svg = (tmp_path / f"{stem}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "wrote" in capsys.readouterr().out


def test_compute_figure_content():
    data = synthetic_sweep()
    fig = plot.plot_compute_vs_accuracy({"dataset": "mnist5k", "updated": "2026-11-25"}, data["rows"])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "GFLOPs = 10⁹ FLOPs" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    texts = [t.get_text() for t in ax.texts] + [t.get_text() for t in fig.texts]
    assert "D64·L4/4 3 ep" in texts  # every point labelled (8 finished runs; the failed one is left out)
    assert sum("ep" in t for t in texts) == 8
    caption = fig.texts[0].get_text()
    assert "mnist5k" in caption and "cpu (x86_64, 2 cores)" in caption and "2026-11-25" in caption
    frontier = [line for line in ax.get_lines() if line.get_label() == "Pareto frontier"]
    assert len(frontier) == 1
    xs, ys = frontier[0].get_data()
    assert list(ys) == sorted(ys) and list(xs) == sorted(xs) and max(ys) == pytest.approx(100 * 0.86)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_throughput_figure(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    assert plot.main([str(tmp_path), "--bench", str(tmp_path / "bench.json")]) == 0
    assert png_size(tmp_path / "throughput.png")[0] > 400
    assert not (tmp_path / "compute_vs_accuracy.png").exists()  # no sweep.json here: the bench figure only

    fig = plot.plot_throughput(*plot.load_bench(tmp_path / "bench.json"))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "1,500 img/s\n1.50×" in texts and "1,300 img/s\n1.30×" in texts
    assert any("skipped: vitkernels-cuda (extension not built)" in t.replace("\n", " ") for t in texts)
    assert [ax.get_title() for ax in fig.axes] == ["mode: eager", "mode: compile"]
    assert [len(ax.patches) for ax in fig.axes] == [2, 1]  # the skipped provider has no bar
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_errors(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "run `python -m vitkernels sweep` first" in capsys.readouterr().err
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": [{"status": "failed", "error": "x"}]}))
    assert plot.main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(PlotError, match="expected a list of rows"):
        plot.load_bench(tmp_path / "bench.json")
