"""The report command on the session multirun, on damaged copies of it, and its table helpers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from lws_lightning.report.assignment import figure_to_png, plot_probs
from lws_lightning.report.build import REPORT_FILE, write_report
from lws_lightning.report.figures import entropy_figure, entropy_series, group_size_shares
from lws_lightning.report.runs import Run, collect_runs, run_settings
from lws_lightning.report.tables import compare_learned, error_table, mixed_settings

EXPERIMENT = "mnist_trio_convnet"


def assert_png_drawn(path: Path, min_side: int = 150) -> None:
    """Check that ``path`` is a PNG of at least ``min_side`` pixels a side with visible content."""
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = imread(path)[..., :3]
    height, width = image.shape[:2]
    assert height >= min_side, f"{path} is only {height} pixels high"
    assert width >= min_side, f"{path} is only {width} pixels wide"
    background = image[0, 0]
    drawn = np.any(np.abs(image - background) > 0.05, axis=-1).mean()
    assert drawn > 0.02, f"{path} is nearly blank: {drawn:.1%} of pixels differ from the corner"
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10, f"{path} has almost no colours"


def copy_runs(multirun_dir: Path, target: Path) -> Path:
    """Copy a multirun without checkpoints and logger folders; return the copy's folder."""
    return Path(
        shutil.copytree(
            multirun_dir, target, ignore=shutil.ignore_patterns("*.ckpt", "wandb", "csv")
        )
    )


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Return the cells of the first Markdown table after ``heading``."""
    section = markdown.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def make_run(sharing: str, error: float, experiment: str = "exp") -> Run:
    return Run(
        path=Path(f"/runs/{sharing}/{error}"),
        experiment=experiment,
        sharing=sharing,
        seed=0,
        results={"test": {"error": error}},
    )


def test_report_cli_on_multirun(lws_multirun, tmp_path):
    output_dir = tmp_path / "report"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "lws_lightning.report",
            str(lws_multirun.sweep_dir),
            "--output-dir",
            str(output_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    report_path = output_dir / REPORT_FILE
    assert f"Wrote {report_path}" in completed.stderr
    markdown = report_path.read_text()

    table = table_rows(markdown, "## Test error (%)")
    assert table[0] == ["sharing", EXPERIMENT]
    assert [row[0] for row in table[2:]] == ["full sharing", "no sharing", "learned sharing"]
    for row in table[2:]:
        assert re.fullmatch(r"(\*\*)?\d+\.\d\d ± \d+\.\d\d \(n=2\)(\*\*)?", row[1]), row

    tests = table_rows(markdown, "### Learned sharing against the baselines")
    assert [row[1] for row in tests[2:]] == ["learned < full sharing", "learned < no sharing"]
    for row in tests[2:]:
        assert row[2:4] == ["2", "2"]
        assert 0.0 < float(row[5]) <= 1.0
        assert float(row[6]) == pytest.approx(1 / 6, abs=1e-4)

    shares = table_rows(markdown, "## Sharing-group sizes")
    assert shares[0] == ["layer", "t=1", "t=2", "t=3"]
    assert len(shares) == 2 + 4  # header, rule, four shareable layers
    for row in shares[2:]:
        assert sum(float(value) for value in row[1:]) == pytest.approx(1.0, abs=0.011)

    weights = table_rows(markdown, "## Weight counts")
    assert {row[1] for row in weights[2:]} == {"full sharing", "no sharing", "learned sharing"}
    assert "## Left out" not in markdown
    assert len(table_rows(markdown, "## Runs")) == 2 + 6

    for name in (f"group_sizes_{EXPERIMENT}.png", f"error_curves_{EXPERIMENT}.png"):
        assert f"]({name})" in markdown
        assert_png_drawn(output_dir / name)


def test_report_errors_match_results(lws_multirun, tmp_path):
    report = write_report([lws_multirun.sweep_dir], tmp_path)
    assert len(report.runs) == 6
    assert not report.skipped
    by_key = {(run.sharing, run.seed): run for run in report.runs}
    assert set(by_key) == set(lws_multirun.jobs)
    for key, job_dir in lws_multirun.jobs.items():
        results = json.loads((job_dir / "results.json").read_text())
        assert by_key[key].experiment == EXPERIMENT
        assert by_key[key].error == results["test"]["error"]

    learned = [by_key[("learned", seed)].error for seed in (0, 1)]
    cell = table_rows(report.markdown.read_text(), "## Test error (%)")[4][1].strip("*")
    mean, std = (float(value) for value in re.findall(r"\d+\.\d+", cell))
    assert mean == pytest.approx(100 * np.mean(learned), abs=0.006)
    assert std == pytest.approx(100 * np.std(learned, ddof=1), abs=0.006)
    assert "## Mixed settings" not in report.markdown.read_text()


def test_report_flags_pooled_runs_with_different_steps(lws_multirun, tmp_path, caplog):
    copy = copy_runs(lws_multirun.sweep_dir, tmp_path / "runs")
    job = copy / lws_multirun.jobs[("learned", 1)].relative_to(lws_multirun.sweep_dir)
    results = json.loads((job / "results.json").read_text())
    steps = results["steps"]
    results["steps"] = steps * 2
    (job / "results.json").write_text(json.dumps(results))

    with caplog.at_level("WARNING", logger="lws_lightning.report.build"):
        report = write_report([copy], tmp_path / "report")

    expected = (
        f"{EXPERIMENT}, learned sharing: training steps differ: "
        f"{steps} (1 run), {steps * 2} (1 run)"
    )
    section = report.markdown.read_text().split("## Mixed settings", 1)[1].split("\n## ", 1)[0]
    assert f"- {expected}" in section
    assert "full sharing" not in section
    assert any(expected in record.getMessage() for record in caplog.records)


def make_settings_run(
    sharing: str,
    steps: int,
    banks: list[int] | None,
    seed: int,
    settings: dict[str, str] | None = None,
) -> Run:
    results = {"test": {"error": 0.1}, "steps": steps}
    if banks is not None:
        results["banks_per_layer"] = banks
    path = Path(f"/runs/{sharing}/{steps}/{seed}")
    return Run(path, "exp", sharing, seed, results, settings or {})


def test_mixed_settings_per_cell():
    same = [
        make_settings_run("learned", 100, [4, 4], seed=0),
        make_settings_run("learned", 100, [4, 4], seed=1),
    ]
    assert mixed_settings(same) == []
    steps = [make_settings_run("none", 100, [3], seed) for seed in (0, 1)]
    steps += [make_settings_run("none", 50, [3], seed) for seed in (0, 1)]
    expected = "exp, no sharing: training steps differ: 100 (2 runs), 50 (2 runs)"
    assert mixed_settings(steps) == [expected]
    # Different settings in different cells are fine.
    cells = [
        make_settings_run("learned", 100, [4, 4], seed=0),
        make_settings_run("full", 50, [1, 1], seed=0),
    ]
    assert mixed_settings(cells) == []
    swept = [
        make_settings_run("learned", 100, [2, 2], seed=0),
        make_settings_run("learned", 100, [8, 8], seed=0),
        make_settings_run("learned", 100, None, seed=0),
    ]
    assert mixed_settings(swept) == [
        "exp, learned sharing: banks per layer differ: "
        "[2, 2] (1 run), [8, 8] (1 run), not recorded (1 run)"
    ]


def test_mixed_settings_config_keys():
    runs = [
        make_settings_run("learned", 100, [3], seed=0, settings={"model.nes_lr": "0.01"}),
        make_settings_run("learned", 100, [3], seed=1, settings={"model.nes_lr": "0.1"}),
        make_settings_run("learned", 100, [3], seed=2, settings={}),
    ]
    assert mixed_settings(runs) == [
        "exp, learned sharing: model.nes_lr differ: 0.01 (1 run), 0.1 (1 run), unset (1 run)"
    ]


def test_mixed_settings_repeated_seeds():
    repeated = [make_settings_run("learned", 100, [3], seed=0) for _ in range(3)]
    repeated.append(make_settings_run("learned", 100, [3], seed=1))
    assert mixed_settings(repeated) == [
        "exp, learned sharing: seed 0 is in 3 runs with the same settings, which repeat one "
        "run rather than add independent samples"
    ]
    # One seed per K of a sweep is not a repeat: only the differing K is reported.
    swept = [
        make_settings_run("learned", 100, [2], seed=0),
        make_settings_run("learned", 100, [5], seed=0),
    ]
    assert mixed_settings(swept) == [
        "exp, learned sharing: banks per layer differ: [2] (1 run), [5] (1 run)"
    ]


def test_run_settings_flatten_config():
    config = {
        "seed": 3,
        "model": {
            "architecture": "dkl_convnet",
            "architecture_options": {"width": 8},
            "sharing": "learned",
            "num_banks": 3,
            "nes_lr": 0.01,
            "engine": "batched",
            "assignment": None,
        },
        "data": {"root": "/data", "batch_size": 16, "num_workers": 4, "seed": "${seed}"},
        "trainer": {"precision": "bf16-mixed", "accelerator": "gpu", "devices": 2},
    }
    assert run_settings(config) == {
        "model.architecture": "dkl_convnet",
        "model.architecture_options.width": "8",
        "model.nes_lr": "0.01",
        "data.batch_size": "16",
        "data.seed": "${seed}",
        "trainer.precision": "bf16-mixed",
        "trainer.devices": "2",
    }


def test_run_settings_compare_values():
    """Equal values written differently give equal settings."""

    def settings(model: dict, trainer: dict | None = None) -> dict[str, str]:
        return run_settings({"model": {"sharing": "learned", **model}, "trainer": trainer or {}})

    assert settings({"nes_lr": 1}) == settings({"nes_lr": 1.0}) == settings({"nes_lr": "1"})
    assert settings({"nes_lr": 0.1}) != settings({"nes_lr": 0.01})
    assert settings({"architecture_options": None}) == settings({"architecture_options": {}})
    assert settings({"architecture_options": {}}) == settings({})
    assert settings({}, {"precision": 32}) == settings({}, {"precision": "32-true"})
    assert settings({}, {"precision": "16"}) == settings({}, {"precision": "16-mixed"})
    assert settings({}, {"devices": 1}) != settings({}, {"devices": 2})
    assert settings({}, {"num_nodes": 1}) == settings({})
    options = [[32, 64], [32.0, 64.0], ["32", "64"]]
    assert len({str(settings({"architecture_options": {"channels": o}})) for o in options}) == 1
    assert settings({"split": "12345678901234567890"}) != settings(
        {"split": "12345678901234567891"}
    )


def test_run_settings_compare_test_subset():
    """The test batch limit counts, and with a limit so does the evaluation batch size."""

    def settings(trainer: dict, eval_batch_size: int = 64) -> dict[str, str]:
        config = {"data": {"eval_batch_size": eval_batch_size}, "trainer": trainer}
        return run_settings(config)

    assert settings({"limit_test_batches": 1.0}) == settings({}) == {}
    assert settings({"limit_test_batches": 1}) == {
        "trainer.limit_test_batches": "1 batch",
        "data.eval_batch_size": "64",
    }
    assert settings({"limit_test_batches": 0.25})["trainer.limit_test_batches"] == (
        "0.25 of the batches"
    )
    assert settings({}, eval_batch_size=32) == settings({}, eval_batch_size=64)
    limited = {"limit_test_batches": 2}
    assert settings(limited, eval_batch_size=32) != settings(limited, eval_batch_size=64)


def test_run_settings_skip_unused_by_sharing():
    """Frozen sharing modes ignore the NES settings, and only fixed sharing reads the assignment."""
    nes = {"nes_lr": 0.5, "nes_samples": 4, "sgd_samples": 2, "p_min": 0.01}
    for sharing in ("full", "none"):
        assert run_settings({"model": {"sharing": sharing, **nes, "lr": 0.1}}) == {
            "model.lr": "0.1"
        }
    fixed = run_settings({"model": {"sharing": "fixed", "assignment": [[0, 1]], **nes}})
    assert fixed == {"model.assignment": "[[0, 1]]"}
    learned = run_settings({"model": {"sharing": "learned", "assignment": [[0, 1]], **nes}})
    assert learned == {
        "model.nes_lr": "0.5",
        "model.nes_samples": "4",
        "model.sgd_samples": "2",
        "model.p_min": "0.01",
    }


def test_report_flags_pooled_architecture_options(lws_multirun, tmp_path):
    copy = copy_runs(lws_multirun.sweep_dir, tmp_path / "runs")
    job = copy / lws_multirun.jobs[("none", 0)].relative_to(lws_multirun.sweep_dir)
    config_path = job / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"]["architecture_options"] = {"width": 8}
    config_path.write_text(yaml.safe_dump(config))

    report = write_report([copy], tmp_path / "report")

    markdown = report.markdown.read_text()
    section = markdown.split("## Mixed settings", 1)[1].split("\n## ", 1)[0]
    expected = (
        f"- {EXPERIMENT}, no sharing: model.architecture_options.width differ: "
        "8 (1 run), unset (1 run)"
    )
    assert section.strip().endswith(expected)
    assert "learned sharing" not in section
    runs = table_rows(markdown, "## Runs")
    assert runs[0][4:6] == ["banks per layer", "steps"]
    assert {row[4] for row in runs[2:]} == {"[1, 1, 1, 1]", "[3, 3, 3, 3]"}
    assert {row[5] for row in runs[2:]} == {"4"}


def test_report_lists_incomplete_runs(lws_multirun, tmp_path):
    copy = copy_runs(lws_multirun.sweep_dir, tmp_path / "runs")
    relative = {
        key: path.relative_to(lws_multirun.sweep_dir) for key, path in lws_multirun.jobs.items()
    }
    failed = copy / relative[("learned", 0)]
    unfinished = copy / relative[("none", 1)]
    corrupt = copy / relative[("full", 1)]
    keyless = copy / relative[("none", 0)]
    (failed / "results.json").unlink()
    (failed / "status.json").write_text(
        json.dumps({"status": "failed", "error": "RuntimeError: out of memory\nmore lines"})
    )
    (unfinished / "results.json").unlink()
    (unfinished / "status.json").unlink(missing_ok=True)
    (corrupt / "results.json").write_text('{"test": {"error": 0.1')
    results = json.loads((keyless / "results.json").read_text())
    del results["assignment"]
    (keyless / "results.json").write_text(json.dumps(results))
    missing = tmp_path / "no_such_folder"

    report = write_report([copy, missing], tmp_path / "report")
    markdown = report.markdown.read_text()

    reasons = {item.path: item.reason for item in report.skipped}
    assert set(reasons) == {failed, unfinished, corrupt, keyless, missing}
    assert reasons[failed] == "no results.json: the job failed (RuntimeError: out of memory)"
    assert reasons[unfinished] == "no results.json (the job failed or has not finished)"
    assert "not valid JSON" in reasons[corrupt]
    assert "'assignment'" in reasons[keyless]
    assert reasons[missing] == "not found"
    left_out = markdown.split("## Left out", 1)[1]
    for path in (failed, unfinished, corrupt, keyless, missing):
        assert f"`{path}`" in left_out
    assert sorted((run.sharing, run.seed) for run in report.runs) == [("full", 0), ("learned", 1)]
    table = table_rows(markdown, "## Test error (%)")
    assert [row[0] for row in table[2:]] == ["full sharing", "learned sharing"]
    assert all(row[1].strip("*").endswith("(n=1)") for row in table[2:])
    tests = table_rows(markdown, "### Learned sharing against the baselines")
    assert tests[3][1:6] == ["learned < no sharing", "1", "0", "—", "—"]
    assert_png_drawn(tmp_path / "report" / f"group_sizes_{EXPERIMENT}.png")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda results: results["history"][0].update(step="two"), "integer step"),
        (lambda results: results["history"][0].update(step=None), "integer step"),
        (
            lambda results: results["test"]["error_per_task"].update(digits="bad"),
            "test.error_per_task",
        ),
    ],
    ids=["string_step", "null_step", "string_task_error"],
)
def test_report_leaves_out_wrong_types(lws_multirun, tmp_path, damage, reason):
    copy = copy_runs(lws_multirun.sweep_dir, tmp_path / "runs")
    job = copy / lws_multirun.jobs[("learned", 0)].relative_to(lws_multirun.sweep_dir)
    results = json.loads((job / "results.json").read_text())
    damage(results)
    (job / "results.json").write_text(json.dumps(results))

    report = write_report([copy], tmp_path / "report")

    assert len(report.runs) == 5
    assert [item.path for item in report.skipped] == [job]
    assert reason in report.skipped[0].reason
    assert report.markdown.is_file()


def test_report_cli_without_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "lws_lightning.report", str(empty), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 1
    assert "No complete run found" in completed.stderr
    markdown = (tmp_path / "out" / REPORT_FILE).read_text()
    assert "0 complete runs, 1 left out" in markdown
    assert f"`{empty}`: no run folder" in markdown


def test_collect_runs_reads_hydra_config(lws_multirun):
    runs, skipped = collect_runs([lws_multirun.jobs[("none", 1)] / "results.json"])
    assert not skipped
    (run,) = runs
    assert (run.experiment, run.sharing, run.seed) == (EXPERIMENT, "none", 1)


def test_collect_runs_finds_multirun_jobs(lws_multirun):
    runs, _ = collect_runs([lws_multirun.sweep_dir.parent])
    assert sorted(run.path for run in runs) == sorted(lws_multirun.jobs.values())


def test_group_size_shares_counts_tasks():
    # Layer 0: tasks 0, 1 share bank 2 and task 2 is alone; layer 1: all three share bank 0.
    first = [[2, 2, 1], [0, 0, 0]]
    # Layer 0: every task alone; layer 1: tasks 1 and 2 share.
    second = [[0, 1, 2], [1, 0, 0]]
    shares = group_size_shares([first, second])
    np.testing.assert_allclose(shares[0], [4 / 6, 2 / 6, 0])
    np.testing.assert_allclose(shares[1], [1 / 6, 2 / 6, 3 / 6])


def test_mann_whitney_one_sided():
    runs = [make_run("learned", e) for e in (0.10, 0.11)]
    runs += [make_run("full", e) for e in (0.20, 0.21)]
    runs += [make_run("none", e) for e in (0.05, 0.06)]
    comparisons = {item.baseline: item for item in compare_learned(runs)}
    assert comparisons["full"].statistic == 0.0
    assert comparisons["full"].p_value == pytest.approx(1 / 6)
    assert comparisons["none"].p_value == pytest.approx(1.0)
    assert comparisons["none"].min_p_value == pytest.approx(1 / 6)


def test_mann_whitney_without_baseline():
    (full, none) = compare_learned([make_run("learned", 0.1), make_run("full", 0.2)])
    assert full.p_value == pytest.approx(0.5)
    assert none.baseline_runs == 0
    assert none.p_value is None
    assert none.min_p_value is None


def test_error_table_layout():
    runs = [make_run("learned", 0.10, "a"), make_run("learned", 0.12, "a")]
    runs += [make_run("full", 0.30, "a"), make_run("none", 0.2, "b")]
    lines = error_table(runs).splitlines()
    assert lines[0] == "| sharing | a | b |"
    assert lines[2] == "| full sharing | 30.00 (n=1) | — |"
    assert lines[3] == "| no sharing | — | 20.00 (n=1) |"
    assert lines[4] == "| learned sharing | **11.00 ± 1.41 (n=2)** | — |"


def test_run_figures_drawn(lws_multirun, tmp_path):
    run_dir = lws_multirun.jobs[("learned", 0)]
    results = json.loads((run_dir / "results.json").read_text())
    assert_png_drawn(run_dir / "assignment.png", min_side=100)

    probs_path = plot_probs(results["probs"], results["tasks"], tmp_path / "probs.png")
    assert_png_drawn(probs_path)

    series, source = entropy_series(run_dir)
    assert source == run_dir / "csv" / "metrics.csv"
    assert sorted(series) == ["routing/entropy", *(f"routing/entropy/layer_{i}" for i in range(4))]
    assert [step for step, _ in series["routing/entropy/layer_0"]] == [1, 2, 3, 4]
    entropy_path = tmp_path / "entropy.png"
    entropy_path.write_bytes(figure_to_png(entropy_figure(series)))
    assert_png_drawn(entropy_path)


def test_entropy_from_history(tmp_path):
    history = [{"step": 2, "entropy": 1.0, "error": 0.5}, {"step": 4, "entropy": 0.8, "error": 0.4}]
    (tmp_path / "results.json").write_text(json.dumps({"history": history}))
    series, source = entropy_series(tmp_path)
    assert source == tmp_path / "results.json"
    assert series == {"routing/entropy": [(2, 1.0), (4, 0.8)]}
    path = tmp_path / "entropy.png"
    path.write_bytes(figure_to_png(entropy_figure(series)))
    assert_png_drawn(path)


def test_entropy_falls_back_without_csv_entropy(tmp_path):
    """A run shorter than the logging interval has a metrics.csv without entropy columns."""
    history = [{"step": 5, "entropy": 1.05, "error": 0.6}]
    (tmp_path / "results.json").write_text(json.dumps({"history": history}))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,step,val/error\n0,4,0.6\n")
    series, source = entropy_series(tmp_path)
    assert source == tmp_path / "results.json"
    assert series == {"routing/entropy": [(5, 1.05)]}
