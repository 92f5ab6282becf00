"""Every paper experiment, in every sharing mode, trains 5 steps on generated data.

The data are small files in each dataset's real on-disk format, read by the real loaders, so
the nets see the experiments' true input shapes and class counts. Widths and sample counts are
shrunk through overrides to keep each run to a few seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lws_lightning.run import train
from tests.data.conftest import write_fake_cifar, write_fake_dkl, write_fake_omniglot

SHRINK = {
    "dkl_mnist_convnet": [
        "+model.architecture_options.width=4",
        "+model.architecture_options.hidden=8",
        "data.train_per_task=40",
    ],
    "cifar100_convnet": [
        "+model.architecture_options.width=4",
        "+model.architecture_options.hidden=8",
    ],
    "cifar100_resnet18": ["+model.architecture_options.base_width=4"],
    "omniglot_convnet": ["+model.architecture_options.width=4", "data.num_tasks=3"],
    "omniglot_resnet18": ["+model.architecture_options.base_width=4", "data.num_tasks=3"],
}
WRITERS = {
    "dkl_mnist_convnet": write_fake_dkl,
    "cifar100_convnet": write_fake_cifar,
    "cifar100_resnet18": write_fake_cifar,
    "omniglot_convnet": write_fake_omniglot,
    "omniglot_resnet18": write_fake_omniglot,
}
EXPECTED_TASKS = {
    "dkl_mnist_convnet": 3,
    "cifar100_convnet": 20,
    "cifar100_resnet18": 20,
    "omniglot_convnet": 3,
    "omniglot_resnet18": 3,
}


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    roots = {}
    for writer in {write_fake_dkl, write_fake_cifar, write_fake_omniglot}:
        root = tmp_path_factory.mktemp(writer.__name__)
        writer(root)
        roots[writer.__name__] = root
    return roots


@pytest.mark.parametrize("sharing", ["learned", "full", "none"])
@pytest.mark.parametrize("experiment", sorted(SHRINK))
def test_experiment_trains_five_steps(compose_config, data_roots, experiment, sharing):
    root = data_roots[WRITERS[experiment].__name__]
    cfg = compose_config(
        f"experiment={experiment}",
        f"model.sharing={sharing}",
        f"data.root={root}",
        "data.download=false",
        "model.num_banks=2",
        "model.nes_samples=2",
        "model.sgd_samples=2",
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
        "logger=none",
        *SHRINK[experiment],
    )
    results = train(cfg)

    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["steps"] == 5
    assert len(saved["tasks"]) == EXPECTED_TASKS[experiment]
    assert len(saved["assignment"][0]) == EXPECTED_TASKS[experiment]
    assert 0.0 <= results["test"]["error"] <= 1.0
