"""ddlm.eval.frontier (the points, their Pareto front, the file) and ddlm.eval.plots (PNG files whose plotted
data are the recorded values) on hand-made inputs."""

import json
import math
import os

import matplotlib.image
import pytest

from ddlm.eval import frontier, plots


def point(label, entropy, ppl, steps=8, precision="float64", tps=100.0):
    return frontier.FrontierPoint(
        label=label,
        sampler="ancestral" if label != "data" else "",
        steps=steps,
        temperature=1.0,
        precision=precision,
        entropy=entropy,
        entropy_se=0.05,
        gen_ppl=ppl,
        gen_ppl_se=0.5,
        tokens_per_s=tps,
        nfe=steps,
        samples=16,
    )


def test_pareto_front_keeps_exactly_the_undominated_points():
    a, b, c, d = point("m", 5.0, 10.0), point("m", 4.0, 8.0), point("m", 4.0, 12.0), point("m", 6.0, 30.0)
    twin = point("m", 5.0, 10.0, steps=16)  # equal to a: neither dominates the other
    worse = point("m", 3.0, 50.0)
    nan = point("m", float("nan"), 5.0)
    front = frontier.pareto_front([a, b, c, d, twin, worse, nan])
    assert [(p.entropy, p.gen_ppl) for p in front] == [(4.0, 8.0), (5.0, 10.0), (5.0, 10.0), (6.0, 30.0)]
    assert c not in front and worse not in front


def test_frontier_file_round_trip_and_bad_file(tmp_path):
    pts = [point("m", 5.0, 10.0), point("data", 5.5, 9.0, steps=0, tps=float("nan"))]
    path = str(tmp_path / "eval" / "frontier.json")
    frontier.save(path, pts)
    back = frontier.load(path)
    assert json.dumps([vars(p) for p in back]) == json.dumps([vars(p) for p in pts])  # nan == nan here
    assert back[1].label == "data" and math.isnan(back[1].tokens_per_s)
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a frontier file"):
        frontier.load(str(tmp_path / "bad.json"))
    text = frontier.format_points(pts)
    assert text.splitlines()[1].startswith("* ")  # (5, 10) is on the front of the model points


def write_run(workdir):
    os.makedirs(workdir / "eval")
    records = [
        {"step": 10, "split": "train", "loss": 3.0},
        {"step": 20, "split": "train", "loss": 9.0},  # overwritten by the rerun of step 20 below
        {"step": 20, "split": "train", "loss": 2.5},
        {"step": 20, "split": "eval", "bits_per_token": 3.5, "bits_per_token_se": 0.1},
        {"step": 30, "split": "train", "loss": 2.0},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pts = [point("run", 4.0, 20.0, 4), point("run", 4.5, 15.0, 8), point("run", 3.5, 12.0, 8, "float32")]
    frontier.save(
        str(workdir / "eval" / "frontier.json"), pts + [point("data", 4.8, 10.0, 0, tps=float("nan"))]
    )


def test_plots_write_pngs_of_the_recorded_values(tmp_path):
    workdir = tmp_path / "run"
    write_run(workdir)
    records = plots.read_metrics(str(workdir))
    assert [r["loss"] for r in records if r["split"] == "train"] == [3.0, 2.5, 2.0]
    fig = plots.plot_loss_curves({"run": records})
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [10, 20, 30] and list(line.get_ydata()) == [3.0, 2.5, 2.0]
    assert list(fig.axes[1].lines[0].get_ydata()) == [3.5]

    fig = plots.plot_frontier(frontier.load(str(workdir / "eval" / "frontier.json")))
    xy = {(tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in fig.axes[0].lines}
    assert ((4.0, 4.5), (20.0, 15.0)) in xy  # the float64 line through its steps
    assert ((4.8,), (10.0,)) in xy  # the data star

    out = tmp_path / "plots"
    written = plots.make_plots([str(workdir)], str(out), tensorboard=True)
    assert sorted(os.path.basename(p) for p in written) == ["frontier.png", "loss_curves.png", "speed.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        h, w = matplotlib.image.imread(path).shape[:2]
        assert h > 200 and w > 300
    events = os.listdir(workdir / "tensorboard")
    with open(workdir / "tensorboard" / events[0], "rb") as f:
        assert b"plots/frontier" in f.read()
    with pytest.raises(ValueError, match="metrics.jsonl does not exist"):
        plots.read_metrics(str(tmp_path))
