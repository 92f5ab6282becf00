"""Export a trained LWS checkpoint for inference: ``python -m lws_lightning.export CKPT OUT``.

Under the most likely assignment, every task has a plain network: the always-shared layers
and the bank it picks in each shareable layer, in trunk order, then its head. The command
writes into ``OUT``:

- ``task_<name>.pt2``, one per task: that network in eval mode as a ``torch.export`` program
  with a dynamic batch dimension. Load it with ``torch.export.load(path).module()``.
- ``multitask.pt``: a compact multi-task checkpoint of plain tensors. It stores the
  always-shared layers, each bank that some task uses (once, however many tasks use it), the
  heads and the assignment. Load it with ``torch.load(path, weights_only=True)``, or rebuild
  the net with :func:`load_multitask`.
- ``manifest.json``: the task names, their files, class counts, input shape and bank paths.

Loading the exported files needs only PyTorch, neither Lightning nor this package.

NOTE: the tests load the programs with the PyTorch version that wrote them (2.14.1); loading
them with another version is untested.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from lws_lightning.errors import UserInputError
from lws_lightning.lit.module import GENERATOR_STATE_KEY, LWSModule
from lws_lightning.nets import build_net
from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.sharing.bank import WeightBank

log = logging.getLogger(__name__)

MULTITASK_FILE = "multitask.pt"
MANIFEST_FILE = "manifest.json"
MULTITASK_FORMAT = "lws_lightning.multitask"
MULTITASK_FORMAT_VERSION = 1

# Init arguments of LWSModule that every LWS checkpoint stores as hyperparameters.
_REQUIRED_HPARAMS = ("architecture", "num_classes", "input_shape", "sharing")


class CheckpointError(UserInputError):
    """A checkpoint file is missing, unreadable or was not written by ``LWSModule``."""


class TaskNetwork(nn.Module):
    """One task's network under a fixed assignment: trunk modules in order, then the head."""

    def __init__(self, layers: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(x))


def load_lws_checkpoint(path: str | Path) -> LWSModule:
    """Load an ``LWSModule`` from a Lightning checkpoint on the CPU, in eval mode.

    Raises:
        CheckpointError: As :func:`read_lws_checkpoint` does, or the weights do not fit the net
            that the hyperparameters describe.
    """
    checkpoint = read_lws_checkpoint(path)
    module = LWSModule(**checkpoint["hyper_parameters"])
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"The weights in {path} do not fit the net its hyperparameters describe: "
            f"{_first_line(error)}"
        ) from None
    return module.eval()


def read_lws_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU and check that ``LWSModule`` wrote it.

    Raises:
        CheckpointError: The file is missing, is not a PyTorch checkpoint, or lacks what
            ``LWSModule`` writes (its hyperparameters, weights and sampler state).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint {path} is a folder. Pass a checkpoint file: the last.ckpt in a run's "
            "output folder."
        )
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} not found. Pass the last.ckpt file from a run's output folder."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch.load fails on arbitrary bytes in many ways: UnpicklingError, KeyError or
        # IndexError for text files, OSError (EINVAL) for a truncated checkpoint.
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
            f"{_first_line(error)}). Pass a last.ckpt written by `python -m lws_lightning`."
        ) from None

    missing = [
        key
        for key in ("state_dict", "hyper_parameters", GENERATOR_STATE_KEY)
        if not isinstance(checkpoint, dict) or key not in checkpoint
    ]
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, dict):
        missing += [f"hyper_parameters.{key}" for key in _REQUIRED_HPARAMS if key not in hparams]
    if missing:
        raise CheckpointError(
            f"{path} is not an LWS checkpoint: it has no {', '.join(missing)}. Pass a "
            "last.ckpt written by `python -m lws_lightning`."
        )
    return checkpoint


def task_network(net: MultiTaskNet, task: int, path: Sequence[int] | Tensor) -> TaskNetwork:
    """Copy task ``task``'s network out of ``net``, using bank ``path[l]`` in shareable layer l.

    The copy shares no tensors with ``net`` and is in eval mode.
    """
    path = [int(bank) for bank in (path.tolist() if isinstance(path, Tensor) else path)]
    if len(path) != len(net.shareable_positions):
        raise ValueError(
            f"path has {len(path)} bank indices, expected one per shareable layer "
            f"({len(net.shareable_positions)})."
        )
    banks = iter(path)
    layers = [
        layer.banks[next(banks)] if isinstance(layer, WeightBank) else layer for layer in net.layers
    ]
    return copy.deepcopy(TaskNetwork(layers, net.heads[task])).eval()


def export_task_network(network: TaskNetwork, input_shape: Sequence[int], path: Path) -> Path:
    """Save ``network`` as a ``torch.export`` program that takes any batch size."""
    example = torch.zeros(2, *input_shape)
    program = torch.export.export(
        network.eval(), (example,), dynamic_shapes=({0: Dim("batch", min=1)},)
    )
    torch.export.save(program, path)
    return path


def compact_checkpoint(module: LWSModule) -> dict[str, Any]:
    """Build the compact multi-task checkpoint of ``module`` under its most likely assignment.

    ``state_dict`` contains the keys of ``module.net.state_dict()`` for the always-shared layers,
    the heads and the banks that some task uses; banks that no task uses are left out.
    """
    net = module.net
    assignment = module.most_likely_assignment().cpu()
    used = {
        position: set(assignment[layer].tolist())
        for layer, position in enumerate(net.shareable_positions)
    }
    bank_key = re.compile(r"^layers\.(\d+)\.banks\.(\d+)\.")
    state_dict = {}
    for key, tensor in net.state_dict().items():
        match = bank_key.match(key)
        if match and int(match.group(2)) not in used[int(match.group(1))]:
            continue
        state_dict[key] = tensor.detach().cpu().clone()

    hparams = module.hparams
    return {
        "format": MULTITASK_FORMAT,
        "format_version": MULTITASK_FORMAT_VERSION,
        "architecture": str(hparams.architecture),
        "architecture_options": dict(hparams.get("architecture_options") or {}),
        "sharing": str(hparams.sharing),
        "task_names": list(module.task_names),
        "num_classes": list(net.num_classes),
        "input_shape": list(net.input_shape),
        "num_banks": list(net.num_banks),
        "assignment": assignment.to(torch.long),
        "state_dict": state_dict,
    }


def load_multitask(path: str | Path) -> tuple[MultiTaskNet, Tensor]:
    """Rebuild the net and the assignment ([layers, tasks]) from a compact checkpoint.

    The net is in eval mode. Banks that no task uses were not stored and keep a fresh random
    initialisation; the assignment never routes through them.
    """
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != MULTITASK_FORMAT:
        raise CheckpointError(f"{path} is not a compact LWS checkpoint ({MULTITASK_FILE}).")
    num_banks = checkpoint["num_banks"]
    net = build_net(
        checkpoint["architecture"],
        max(num_banks),
        checkpoint["num_classes"],
        checkpoint["input_shape"],
        **checkpoint["architecture_options"],
    )
    if net.num_banks != num_banks:
        raise CheckpointError(
            f"{path} stores {num_banks} banks per layer, but {checkpoint['architecture']} "
            f"builds {net.num_banks}."
        )
    result = net.load_state_dict(checkpoint["state_dict"], strict=False)
    unused_bank = re.compile(r"^layers\.\d+\.banks\.\d+\.")
    not_banks = [key for key in result.missing_keys if not unused_bank.match(key)]
    if result.unexpected_keys or not_banks:
        raise CheckpointError(
            f"{path} does not fit {checkpoint['architecture']}: missing {not_banks}, "
            f"unexpected {result.unexpected_keys}."
        )
    return net.eval(), checkpoint["assignment"]


def export_checkpoint(checkpoint_path: str | Path, output_dir: str | Path) -> list[Path]:
    """Write the task programs, the compact checkpoint and the manifest; return their paths."""
    module = load_lws_checkpoint(checkpoint_path)
    output_dir = Path(output_dir)
    stems = _file_stems(module.task_names)
    _check_no_stale_task_files(output_dir, {f"task_{stem}.pt2" for stem in stems})
    output_dir.mkdir(parents=True, exist_ok=True)
    net = module.net
    assignment = module.most_likely_assignment().cpu()

    written = []
    tasks = []
    for task, (name, stem) in enumerate(zip(module.task_names, stems, strict=True)):
        network = task_network(net, task, assignment[:, task])
        file = export_task_network(network, net.input_shape, output_dir / f"task_{stem}.pt2")
        written.append(file)
        tasks.append(
            {
                "name": name,
                "file": file.name,
                "num_classes": net.num_classes[task],
                "banks": assignment[:, task].tolist(),
            }
        )

    compact = output_dir / MULTITASK_FILE
    torch.save(compact_checkpoint(module), compact)
    written.append(compact)

    manifest = output_dir / MANIFEST_FILE
    manifest.write_text(
        json.dumps(
            {
                "checkpoint": str(Path(checkpoint_path).resolve()),
                "architecture": module.hparams.architecture,
                "sharing": module.hparams.sharing,
                "input_shape": list(net.input_shape),
                "multitask": MULTITASK_FILE,
                "tasks": tasks,
            },
            indent=2,
        )
    )
    written.append(manifest)
    return written


def _check_no_stale_task_files(output_dir: Path, task_files: set[str]) -> None:
    """Raise if ``output_dir`` contains task programs that this export would not overwrite.

    Such files come from another export, and next to the new manifest they would pass for
    tasks of this checkpoint.
    """
    if not output_dir.is_dir():
        return
    stale = sorted(
        path.name for path in output_dir.glob("task_*.pt2") if path.name not in task_files
    )
    if stale:
        raise UserInputError(
            f"{output_dir} already contains task programs of another export: {', '.join(stale)}. "
            "Export into an empty folder, or delete those files first."
        )


def _file_stems(names: Sequence[str]) -> list[str]:
    """Turn task names into distinct file-name parts."""
    stems: list[str] = []
    for index, name in enumerate(names):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_.") or f"{index}"
        while stem in stems:
            stem = f"{stem}_{index}"
        stems.append(stem)
    return stems


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for invalid input)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m lws_lightning.export",
        description=(
            "Export each task's network under the most likely assignment as a torch.export "
            "program, plus a compact multi-task checkpoint that stores each used bank once."
        ),
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="last.ckpt of an LWS run, or the run's output folder that contains it",
    )
    parser.add_argument("output_dir", type=Path, metavar="OUT", help="folder for the files")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint
    if checkpoint.is_dir() and (checkpoint / "last.ckpt").is_file():
        checkpoint = checkpoint / "last.ckpt"
    try:
        written = export_checkpoint(checkpoint, args.output_dir)
    except UserInputError as error:
        log.error("%s", error)
        return 2
    for path in written:
        log.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
