"""Export of trained checkpoints: outputs equal the module's, files load with PyTorch alone."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lws_lightning.errors import UserInputError
from lws_lightning.export import (
    MANIFEST_FILE,
    MULTITASK_FILE,
    CheckpointError,
    compact_checkpoint,
    export_checkpoint,
    load_lws_checkpoint,
    load_multitask,
    main,
)
from lws_lightning.lit.module import GENERATOR_STATE_KEY, LWSModule

# Runs in a fresh interpreter where importing Lightning or this package raises ImportError, so
# it proves that the exported files load with PyTorch alone.
LOADER = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    for name in ("lightning", "pytorch_lightning", "lws_lightning"):
        sys.modules[name] = None  # a None entry makes `import name` raise ImportError

    import torch

    inputs_path, result_path, *export_dirs = (Path(arg) for arg in sys.argv[1:])
    inputs = torch.load(inputs_path, weights_only=True)
    results = {}
    for export_dir in export_dirs:
        manifest = json.loads((export_dir / "manifest.json").read_text())
        logits = {}
        for task in manifest["tasks"]:
            program = torch.export.load(export_dir / task["file"]).module()
            with torch.no_grad():
                logits[task["name"]] = program(inputs[task["name"]])
        compact = torch.load(export_dir / "multitask.pt", weights_only=True)
        results[export_dir.name] = {
            "logits": logits,
            "compact_keys": sorted(compact["state_dict"]),
            "compact_assignment": compact["assignment"],
        }
    blocked = []
    for name in ("lightning", "lws_lightning"):
        try:
            __import__(name)
        except ImportError:
            blocked.append(name)
    torch.save({"exports": results, "blocked": blocked}, result_path)
    """
)


def load_without_package(tmp_path: Path, inputs: dict, export_dirs: list[Path]) -> dict:
    """Load ``export_dirs`` in a subprocess that cannot import Lightning or this package."""
    torch.save(inputs, tmp_path / "inputs.pt")
    command = [sys.executable, "-c", LOADER, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    completed = subprocess.run(
        [*command, *(str(path) for path in export_dirs)], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    return torch.load(tmp_path / "out.pt", weights_only=True)


# The module evaluates with its engine, which folds batch norm into the layer before it, so
# float32 results differ from the exported plain layers by rounding.
RTOL, ATOL = 1e-4, 1e-5


def module_logits(module: LWSModule, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Evaluation logits of the training module under its most likely assignment."""
    module.eval()
    assignment = module.most_likely_assignment()
    with torch.no_grad():
        return {
            name: module.engine.predict(module.net, inputs[name], task, assignment[:, task])
            for task, name in enumerate(module.task_names)
        }


def random_inputs(module: LWSModule, batch_sizes: tuple[int, ...] = (5, 1, 3)) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = module.net.input_shape
    return {
        name: torch.rand(batch_sizes[task % len(batch_sizes)], *shape, generator=generator)
        for task, name in enumerate(module.task_names)
    }


def used_banks(assignment: torch.Tensor, shareable_positions: list[int]) -> set[tuple[int, int]]:
    """(trunk position, bank) pairs that some task's path goes through."""
    return {
        (position, int(bank))
        for layer, position in enumerate(shareable_positions)
        for bank in assignment[layer].unique()
    }


def stored_banks(keys: list[str]) -> set[tuple[int, int]]:
    pairs = set()
    for key in keys:
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "banks":
            pairs.add((int(parts[1]), int(parts[3])))
    return pairs


def tiny_module(task_names: list[str]) -> LWSModule:
    """A small untrained DKL ConvNet module with the given task names."""
    return LWSModule(
        architecture="dkl_convnet",
        num_classes=[3] * len(task_names),
        input_shape=(1, 16, 16),
        num_banks=2,
        architecture_options={"width": 3, "hidden": 5},
        task_names=task_names,
    )


def save_checkpoint(module: LWSModule, path: Path) -> Path:
    """Save the keys of a Lightning checkpoint that the exporter reads."""
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            GENERATOR_STATE_KEY: module.generator.get_state(),
        },
        path,
    )
    return path


def test_export_matches_module(lws_multirun, tmp_path, caplog):
    # Full sharing is exported by test_export_cli_subprocess (slow).
    modules, export_dirs = {}, []
    for sharing in ("learned", "none"):
        checkpoint = lws_multirun.jobs[(sharing, 0)] / "last.ckpt"
        export_dir = tmp_path / sharing
        # The command accepts a run folder in place of its last.ckpt.
        source = checkpoint if sharing == "learned" else checkpoint.parent
        with caplog.at_level(logging.INFO):
            assert main([str(source), str(export_dir)]) == 0
        assert f"Wrote {export_dir / MULTITASK_FILE}" in caplog.text
        modules[sharing] = LWSModule.load_from_checkpoint(checkpoint, map_location="cpu")
        export_dirs.append(export_dir)
    task_names = modules["learned"].task_names
    inputs = random_inputs(modules["learned"])

    result = load_without_package(tmp_path, inputs, export_dirs)

    assert result["blocked"] == ["lightning", "lws_lightning"]
    for sharing, module in modules.items():
        exported = result["exports"][sharing]
        manifest = json.loads((tmp_path / sharing / MANIFEST_FILE).read_text())
        assert [task["name"] for task in manifest["tasks"]] == task_names
        expected = module_logits(module, inputs)
        for name in task_names:
            torch.testing.assert_close(
                exported["logits"][name], expected[name], rtol=RTOL, atol=ATOL
            )
        assignment = module.most_likely_assignment()
        torch.testing.assert_close(exported["compact_assignment"], assignment)
        positions = module.net.shareable_positions
        assert stored_banks(exported["compact_keys"]) == used_banks(assignment, positions)


@pytest.mark.slow
def test_export_cli_subprocess(lws_multirun, tmp_path):
    checkpoint = lws_multirun.jobs[("full", 1)] / "last.ckpt"
    export_dir = tmp_path / "full"
    completed = subprocess.run(
        [sys.executable, "-m", "lws_lightning.export", str(checkpoint), str(export_dir)],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    manifest = json.loads((export_dir / MANIFEST_FILE).read_text())
    for task in manifest["tasks"]:
        assert f"Wrote {export_dir / task['file']}" in completed.stderr
    assert all(task["banks"] == [0, 0, 0, 0] for task in manifest["tasks"])

    module = LWSModule.load_from_checkpoint(checkpoint, map_location="cpu")
    inputs = random_inputs(module)
    exported = load_without_package(tmp_path, inputs, [export_dir])["exports"]["full"]
    expected = module_logits(module, inputs)
    for name in module.task_names:
        torch.testing.assert_close(exported["logits"][name], expected[name], rtol=RTOL, atol=ATOL)
    assert stored_banks(exported["compact_keys"]) == {
        (position, 0) for position in module.net.shareable_positions
    }

    missing = subprocess.run(
        [sys.executable, "-m", "lws_lightning.export", str(tmp_path / "no.ckpt"), str(export_dir)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert f"Checkpoint {tmp_path / 'no.ckpt'} not found" in missing.stderr


def test_compact_checkpoint_rebuilds_net(lws_multirun, tmp_path):
    checkpoint = lws_multirun.jobs[("learned", 1)] / "last.ckpt"
    export_checkpoint(checkpoint, tmp_path)
    net, assignment = load_multitask(tmp_path / MULTITASK_FILE)

    module = load_lws_checkpoint(checkpoint)
    inputs = random_inputs(module)
    expected = module_logits(module, inputs)
    with torch.no_grad():
        for task, name in enumerate(module.task_names):
            logits = net.forward_task(inputs[name], task, assignment[:, task])
            torch.testing.assert_close(logits, expected[name], rtol=1e-5, atol=1e-6)


def test_compact_checkpoint_stores_banks_once():
    module = LWSModule(
        architecture="dkl_convnet",
        num_classes=[2, 3, 4],
        input_shape=(1, 8, 8),
        sharing="fixed",
        num_banks=3,
        # Layers 0-3 over tasks 0-2: layer 0 shares bank 2 among all tasks, layer 3 uses all.
        assignment=[[2, 2, 2], [0, 1, 0], [1, 1, 2], [0, 1, 2]],
        architecture_options={"width": 2, "hidden": 4},
    )
    compact = compact_checkpoint(module)
    positions = module.net.shareable_positions
    assert stored_banks(list(compact["state_dict"])) == {
        (positions[0], 2),
        (positions[1], 0),
        (positions[1], 1),
        (positions[2], 1),
        (positions[2], 2),
        (positions[3], 0),
        (positions[3], 1),
        (positions[3], 2),
    }
    full = module.net.state_dict()
    for key, tensor in compact["state_dict"].items():
        torch.testing.assert_close(tensor, full[key])
    heads = {key for key in full if key.startswith("heads.")}
    assert heads <= set(compact["state_dict"])


@pytest.mark.parametrize(
    ("architecture", "options", "input_shape"),
    [
        ("dkl_convnet", {"width": 3, "hidden": 5}, (1, 16, 16)),
        ("routing_convnet", {"width": 3, "hidden": 5}, (3, 16, 16)),
        ("slo_convnet", {"width": 3}, (1, 20, 20)),
        ("resnet18", {"variant": "cifar", "base_width": 2}, (3, 16, 16)),
    ],
)
def test_export_architectures(tmp_path, architecture, options, input_shape):
    module = LWSModule(
        architecture=architecture,
        num_classes=[3, 5],
        input_shape=input_shape,
        num_banks=2,
        architecture_options=options,
        task_names=["first task", "second/task"],
    )
    with torch.no_grad():
        module.distribution.probs[:, 1] = torch.tensor([0.1, 0.9], dtype=torch.float64)
        for layer in module.net.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
    checkpoint = save_checkpoint(module, tmp_path / "model.ckpt")

    written = export_checkpoint(checkpoint, tmp_path / "export")

    assert sorted(path.name for path in written) == sorted(
        ["task_first_task.pt2", "task_second_task.pt2", MULTITASK_FILE, MANIFEST_FILE]
    )
    inputs = random_inputs(module, batch_sizes=(4, 1))
    expected = module_logits(module, inputs)
    for name, file in (
        ("first task", "task_first_task.pt2"),
        ("second/task", "task_second_task.pt2"),
    ):
        program = torch.export.load(tmp_path / "export" / file).module()
        with torch.no_grad():
            torch.testing.assert_close(program(inputs[name]), expected[name], rtol=RTOL, atol=ATOL)


def test_missing_checkpoint_names_file(tmp_path):
    path = tmp_path / "absent.ckpt"
    with pytest.raises(CheckpointError, match=f"Checkpoint {path} not found"):
        load_lws_checkpoint(path)


def test_folder_without_checkpoint_names_file(tmp_path, caplog):
    expected = f"Checkpoint {tmp_path} is a folder. Pass a checkpoint file: the last.ckpt in "
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_lws_checkpoint(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert expected in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a readable PyTorch checkpoint"),
        (b"plain text, not a checkpoint", "is not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_checkpoint_names_file(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path} {message}"):
        load_lws_checkpoint(path)


def test_non_lws_checkpoint_names_keys(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError) as error:
        load_lws_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path} is not an LWS checkpoint")
    assert GENERATOR_STATE_KEY in message
    assert "hyper_parameters.architecture" in message


def test_export_cli_error_exit_code(tmp_path, caplog):
    path = tmp_path / "weights.pt"
    torch.save([1, 2, 3], path)
    with caplog.at_level(logging.ERROR):
        status = main([str(path), str(tmp_path / "out")])
    assert status == 2
    assert f"{path} is not an LWS checkpoint" in caplog.text
    assert not (tmp_path / "out").exists()


def test_export_rejects_stale_task_files(tmp_path):
    first = tiny_module(["alpha", "beta"])
    second = tiny_module(["gamma"])
    export_dir = tmp_path / "export"
    export_checkpoint(save_checkpoint(first, tmp_path / "first.ckpt"), export_dir)
    before = {path.name: path.read_bytes() for path in export_dir.iterdir()}

    with pytest.raises(UserInputError) as error:
        export_checkpoint(save_checkpoint(second, tmp_path / "second.ckpt"), export_dir)

    assert "task_alpha.pt2, task_beta.pt2" in str(error.value)
    assert {path.name: path.read_bytes() for path in export_dir.iterdir()} == before
    # The same checkpoint again overwrites its own files.
    export_checkpoint(tmp_path / "first.ckpt", export_dir)
