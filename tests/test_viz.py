"""Figures a reader can read: every FID-vs-CLIP point labelled with its guidance, one legend entry per model, axes
named; Fig. 2 tells attention from ResNet blocks and has ticks on both axes; PNG and SVG; and without matplotlib a
one-line error (recipe.py) or a skipped loss plot (training), never a traceback."""

import re
import sys

from helpers import run_main, tiny_pipeline

from snapfusion_min.formats.figures import arms_plot, loss_plot, steps_plot
from snapfusion_min.latency import LatencyTable, fig2
from snapfusion_min.toy.tables import sweep
from snapfusion_min.training import write_figures


def texts(svg_path) -> list[str]:
    """The text of an SVG written with svg.fonttype 'none' (text stays text)."""
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg_path.read_text())


def test_fid_clip_curves_label_every_point_and_each_model_once(tmp_path):
    judge = lambda pipe, steps, g: {"clip_score": 0.9 + g / 100, "fid": 10 - g + steps / 100,  # noqa: E731
                                    "accuracy": {"color": 1.0, "shape": 1.0}, "judged": {"color": 1.0}}
    configs = [("ours, 8 steps", None, 8, g) for g in (1.5, 2.0, 4.0)] + \
              [("baseline", None, 50, g) for g in (1.5, 2.0, 4.0)] + [("baseline", None, 8, 2.0)] + \
              [("teacher 50-step", None, 50, 2.0)]
    sweep(configs, judge, tmp_path / "fig.png", "Fig. 4")
    words = texts(tmp_path / "fig.svg")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert sorted(w for w in words if w.startswith("w=")) == ["w=1.5"] * 2 + ["w=2"] * 4 + ["w=4"] * 2
    legend = [w for w in words if w.startswith(("ours", "baseline", "teacher"))]
    assert legend == ["ours, 8 steps", "baseline (50 steps)", "baseline (8 steps)", "teacher 50-step"]
    assert "CLIP score (toy CLIP; higher is better)" in words and "Fig. 4" in words
    sweep([("vanilla", None, 8, 2.0), ("mixed", None, 8, 2.0)], judge, tmp_path / "fig6.png")  # one step count
    assert [w for w in texts(tmp_path / "fig6.svg") if w.startswith(("vanilla", "mixed"))] == ["vanilla", "mixed"]
    assert sum(re.fullmatch(r"\d+(\.\d+)?", w) is not None for w in words) >= 6  # ticks on both axes


def test_fig2_tells_block_kinds_apart_with_ticks_on_both_axes(tmp_path):
    pipe = tiny_pipeline()
    blocks = pipe.unet.spec.addresses()
    table = LatencyTable(device="cpu", batch=2, latent=8, dtype="float32")
    table.block_ms = lambda spec: {a: 1.0 + i / 10 for i, a in enumerate(blocks)}  # shapes, not timings, here
    fig2(pipe.unet, table, pipe.text_encoder.cfg.context_length, tmp_path / "fig2.png")
    words = texts(tmp_path / "fig2.svg")
    assert {"cross-attention (A)", "ResNet (R)", "latency (ms)", "parameters (M)"} <= set(words)
    assert [w for w in words if w in blocks] == blocks  # every block named, in network order
    numbers = [w for w in words if re.fullmatch(r"\d+(\.\d+)?", w)]
    assert len(numbers) >= 6 and sum(float(w) == 0 for w in numbers) == 2  # both y axes ticked from 0, not only
    # at their maximum


def test_loss_plot_has_named_axes(tmp_path):
    loss_plot([10, 20, 30], [1.0, 0.5, 0.25], tmp_path / "loss.png", "training loss (Eq. 6)", "loss (mean of 10 steps)")
    words = texts(tmp_path / "loss.svg")
    assert {"optimizer step", "loss (mean of 10 steps)", "training loss (Eq. 6)"} <= set(words)
    assert (tmp_path / "loss.png").stat().st_size > 5_000


def test_arms_plot_draws_an_interval_that_lies_above_its_estimate(tmp_path):
    """FID's bootstrap draws repeat images, which raises FID: its interval can lie wholly above the estimate (the
    --arms run of issue #40 had one); the figure draws it as it is, one legend entry per arm."""
    arms = {name: {"ms": [10.0 + i, 11.0 + i], "clip": [0.70, 0.71], "fid": [20.0, 21.0],
                   "clip_ci": (0.705, 0.69, 0.72), "fid_ci": (20.5, 21.0 + i, 24.0)} for i, name in enumerate("AB")}
    arms_plot(arms, tmp_path / "arms.png", "Alg. 1 and its baselines")
    words = texts(tmp_path / "arms.svg")
    assert [w for w in words if w in arms] == ["A", "B"] and "Alg. 1 and its baselines" in words
    assert (tmp_path / "arms.png").stat().st_size > 10_000


def test_steps_plot_names_both_panels_and_ticks_the_measured_steps(tmp_path):
    steps = [1, 2, 4, 8, 50]
    curves = {"leading grid": [(n, 0.9 - 0.5 / n, 6 + 30 / n) for n in steps],
              "trailing grid": [(n, 0.93 - 0.2 / n, 6 + 20 / n) for n in steps]}
    steps_plot(curves, tmp_path / "steps.png", "DDIM over steps")
    words = texts(tmp_path / "steps.svg")
    assert {"sampling steps", "CLIP score (toy CLIP; higher is better)", "FID on toy-CLIP features (lower is better)",
            "DDIM over steps"} <= set(words)
    assert words.count("leading grid") == 2 and words.count("trailing grid") == 2  # a legend in each panel
    assert [w for w in words if w in {str(n) for n in steps}][:5] == [str(n) for n in steps]  # x ticks: the steps
    assert (tmp_path / "steps.png").stat().st_size > 10_000


def test_without_matplotlib(tmp_path, monkeypatch, capsys):
    """Training skips its loss plot with a note (the samples grid is PIL); recipe.py stops before any work."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = str(tmp_path / "model.safetensors")
    write_figures(out, [1.0, 0.5], tiny_pipeline())
    printed = capsys.readouterr().out
    assert f"skipped {out}.loss.png: figures need matplotlib: pip install 'snapfusion-min[plots]'" in printed
    assert (tmp_path / "model.safetensors.samples.png").is_file()
    assert not (tmp_path / "model.safetensors.loss.png").exists()
    code = run_main("recipe.py", "--quick", "--work-dir", str(tmp_path / "w"), "--report-dir", str(tmp_path / "r"))
    assert isinstance(code, str) and code.startswith("recipe.py: error: figures need matplotlib: pip install")
    assert not (tmp_path / "w" / "recipe.json").exists()
