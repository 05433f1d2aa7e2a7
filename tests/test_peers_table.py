"""benchmarks/peers_table.py: compare.sh's OUT folder -> tokens/s, ratios and fractions of the calibrated matmul rate."""

import os
import statistics
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import peers_table


def _small_step_flops():
    """6 N + 12 layers d L per token (Kaplan et al.), written out for the peers' small shape: 12 blocks of
    qkv + out (4 d^2) and MLP (2 x 4 d^2) kernels, the output layer d x 4097; 2,048 tokens a step."""
    d, layers, seq = 768, 12, 256
    n = layers * (4 * d * d + 2 * d * 4 * d) + d * 4097
    return (6 * n + 12 * layers * d * seq) * 8 * seq


def _write(out, rows):
    """rows: (size, round, codebase, calibration, step ms list, warmup, log style) -> runs.tsv and logs."""
    with open(out / "runs.tsv", "w") as tsv:
        for size, rnd, cb, gf, steps, warm, style in rows:
            log = out / f"{size}_r{rnd}_{cb}.log"
            with open(log, "w") as f:
                f.write("compile 12.3 s\n")
                for i, ms in enumerate(steps):
                    if style == "mdlm":
                        f.write(f"step {i:4d} loss 8.1234 time {ms:.1f} ms\n")
                    else:
                        f.write(f"step {i:4d} | {ms:8.1f} ms |   300 tok/s | loss 8.0 nats/tok\n")
            tsv.write(f"{size}\t{rnd}\t{cb}\t{gf}\t1.50 1.20 1.00\t{warm}\t0\t60\t{log}\n")


def test_the_table_reads_steps_after_warmup_and_divides_the_model_flops_by_each_runs_calibration(tmp_path):
    # round 1: ddlm 6.0 s (its warm-up step of 9 s dropped), md4 7.95 s, MDLM 7.0 s (its own log format);
    # round 2: ddlm 7.0 s, md4 8.5 s, MDLM 6.5 s.
    _write(
        tmp_path,
        [
            ("small", 1, "ddlm", 200.0, [9000, 6000, 5900, 6100], 1, "ddlm"),
            ("small", 1, "md4", 190.0, [8000, 8000, 7900], 1, "ddlm"),
            ("small", 1, "mdlm", 180.0, [7500, 7000, 7100, 6900], 1, "mdlm"),
            ("small", 2, "ddlm", 210.0, [9000, 7000, 7000, 7000], 1, "ddlm"),
            ("small", 2, "md4", 205.0, [9000, 8500], 1, "ddlm"),
            ("small", 2, "mdlm", 195.0, [9000, 6500, 6500], 1, "mdlm"),
        ],
    )
    runs = peers_table.read_runs(str(tmp_path))
    assert [(r.codebase, r.round, r.step_seconds) for r in runs][:3] == [
        ("ddlm", (0, 1), [6.0, 5.9, 6.1]),
        ("md4", (0, 1), [8.0, 7.9]),  # the same warm-up count dropped for every codebase, as compare.sh does
        ("mdlm", (0, 1), [7.0, 7.1, 6.9]),
    ]
    flops = peers_table.step_flops("small", batch=8, seq=256, vocab=4096)
    assert flops == pytest.approx(_small_step_flops(), rel=1e-12)
    assert flops / 1e9 == pytest.approx(1140.3, abs=0.05)  # the figure

    table = peers_table.summarize(runs, {"small": flops}, 2048)["small"]
    (r1, c1), (r2, c2) = table["rounds"]
    assert (r1, r2) == ((0, 1), (0, 2))
    assert c1["ddlm"][0] == pytest.approx(2048 / 6.0)
    assert c1["ddlm"][2] == pytest.approx(flops / 6.0 / 1e9 / 200.0)  # achieved / calibrated
    assert c2["mdlm"][2] == pytest.approx(flops / 6.5 / 1e9 / 195.0)
    assert c1["md4"][1] == 190.0
    # medians of per-round ratios and fractions; tokens/s over every timed step of the codebase
    assert table["ratio_mdlm"] == pytest.approx(statistics.median([7.0 / 6.0, 6.5 / 7.0]))
    assert table["ratio_md4"] == pytest.approx(statistics.median([7.95 / 6.0, 8.5 / 7.0]))
    assert table["fraction"]["ddlm"] == pytest.approx(
        statistics.median([flops / 6.0 / 1e9 / 200.0, flops / 7.0 / 1e9 / 210.0])
    )
    assert table["tok"]["ddlm"] == pytest.approx(2048 / statistics.median([6.0, 5.9, 6.1, 7.0, 7.0, 7.0]))

    # the steadier figure: each codebase's median step over all rounds against the median of all 6 calibrations
    calibration = statistics.median([200.0, 190.0, 180.0, 210.0, 205.0, 195.0])
    assert table["calibration"] == pytest.approx(calibration)
    assert table["fraction_pooled"]["ddlm"] == pytest.approx(flops / 6.55 / 1e9 / calibration)  # median of 6 steps
    assert table["fraction_pooled"]["md4"] == pytest.approx(flops / 8.0 / 1e9 / calibration)
    assert table["fraction_pooled"]["mdlm"] == pytest.approx(flops / 6.9 / 1e9 / calibration)  # median of 5 steps

    text = peers_table.render({"small": table})
    row = next(line for line in text.splitlines() if line.startswith("| small"))
    fractions, pooled = (
        ", ".join(f"{table[key][cb]:.2f}" for cb in ("ddlm", "md4", "mdlm")) for key in ("fraction", "fraction_pooled")
    )
    assert row.endswith(
        f"| {table['ratio_md4']:.2f} | {table['ratio_mdlm']:.2f} | {fractions} | {pooled} (of {calibration:.0f} GFLOP/s) |"
    ), row


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    assert peers_table.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs.tsv" in err and str(tmp_path) in err
    (tmp_path / "runs.tsv").write_text("small\t1\tddlm\n")
    assert peers_table.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1" in err and "9 tab-separated fields" in err


def test_folders_of_several_runs_pool_their_rounds(tmp_path, capsys):
    """Two compare.sh folders, one round each: the table's medians run over both rounds."""
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, (ddlm_ms, mdlm_ms, gf) in ((first, (6000, 7000, 200.0)), (second, (7000, 6300, 180.0))):
        folder.mkdir()
        _write(
            folder,
            [
                ("small", 1, "ddlm", gf, [9000, ddlm_ms], 1, "ddlm"),
                ("small", 1, "md4", gf, [9000, 8000], 1, "ddlm"),
                ("small", 1, "mdlm", gf, [9000, mdlm_ms], 1, "mdlm"),
            ],
        )
    assert peers_table.main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "folder 0 round 1" in out and "folder 1 round 1" in out
    flops = _small_step_flops()
    fraction = statistics.median([flops / 6.0 / 1e9 / 200.0, flops / 7.0 / 1e9 / 180.0])
    ratio = statistics.median([7.0 / 6.0, 6.3 / 7.0])
    row = next(line for line in out.splitlines() if line.startswith("| small (2 rounds)"))
    assert f"| {ratio:.2f} | {fraction:.2f}, " in row, row
