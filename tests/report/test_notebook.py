"""notebooks/inspect_run.ipynb: stored without outputs, and runs on a multirun job."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import nbformat
import pytest
from matplotlib.image import imread
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "inspect_run.ipynb"


def outputs_of(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def test_notebook_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], cell.source[:60]
        assert cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("metrics", ["csv", "history"])
def test_notebook_runs_on_job(lws_multirun, monkeypatch, tmp_path, metrics):
    run_dir = lws_multirun.jobs[("learned", 0)]
    entropy_source = run_dir / "csv" / "metrics.csv"
    if metrics == "history":
        # Without csv/metrics.csv the notebook reads π's entropy from results.json.
        run_dir = Path(
            shutil.copytree(
                run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("*.ckpt", "csv", "wandb")
            )
        )
        entropy_source = run_dir / "results.json"
    monkeypatch.setenv("LWS_RUN_DIR", str(run_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)

    client = NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    outputs = outputs_of(notebook)
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, errors
    images = [
        output.data["image/png"] for output in outputs if "image/png" in output.get("data", {})
    ]
    assert len(images) == 3  # assignment, π at the end, entropy over time
    for encoded in images:
        image = imread(io.BytesIO(base64.b64decode(encoded)), format="png")
        assert image.shape[0] >= 100
        assert image.shape[1] >= 100
    markdown = "\n".join(
        output.data["text/markdown"]
        for output in outputs
        if "text/markdown" in output.get("data", {})
    )
    assert f"Read from `{entropy_source}`." in markdown
    assert "| sharing | mnist_trio_convnet |" in markdown
    assert "| learned sharing | " in markdown
    assert "Left out" not in markdown
