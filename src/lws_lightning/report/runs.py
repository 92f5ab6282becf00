"""Find finished runs under run and multirun folders and read what the report needs from them.

A run folder is one that contains ``results.json`` or Hydra's ``.hydra/config.yaml``. A Hydra job
writes ``.hydra/`` when it starts and ``results.json`` when it ends, so a folder with only the
first belongs to a job that failed or is still running.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)

# Written by lws_lightning.results.write_results and lws_lightning.jobs.write_status. Those
# modules import Lightning, which the report does not need, so the names are repeated here.
RESULTS_FILE = "results.json"
STATUS_FILE = "status.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_RUNTIME = Path(".hydra") / "hydra.yaml"

# Folders inside a run that hold logger output, never further runs.
_SKIPPED_FOLDERS = {"wandb", "csv", "tensorboard", "checkpoints", "__pycache__"}

# Config sections whose values define what a run computes, so the runs of one table cell
# should agree on them. Runs that differ only in the keys of IGNORED_SETTINGS compute the same
# quantities: the engine, where the data lies and how it is loaded, and (without a test batch
# limit) the evaluation batch size change speed, not results. model.sharing names the cell
# itself. The number of processes counts because each DDP process reads its own batches.
COMPARED_SECTIONS = ("model", "data")
COMPARED_KEYS = (
    "trainer.precision",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.limit_test_batches",
)
# Lightning's defaults of compared trainer keys: a run that sets one equals a run without it.
_TRAINER_DEFAULTS = {"trainer.num_nodes": "1", "trainer.limit_test_batches": "all"}
IGNORED_SETTINGS = frozenset(
    {
        "model.sharing",
        "model.engine",
        # results.json records K per layer as banks_per_layer, which the report compares.
        "model.num_banks",
        "data.root",
        "data.download",
        "data.num_workers",
        "data.pin_memory",
        "data.eval_batch_size",
        "data.fashion_source",
    }
)
# Settings that a frozen π (sharing full, none or fixed) never uses: these modes skip the
# NES step and take one SGD sample. model.assignment applies to fixed sharing only.
NES_SETTINGS = frozenset({"model.nes_lr", "model.nes_samples", "model.sgd_samples", "model.p_min"})
FROZEN_SHARING = ("full", "none", "fixed")
# Lightning's full names of its short precision values.
_PRECISION_NAMES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class IncompleteRunError(ValueError):
    """A run folder lacks a file or key that the report needs."""


@dataclass(frozen=True)
class Run:
    """One finished run: where it is, how it was configured and its ``results.json``."""

    path: Path
    experiment: str
    sharing: str
    seed: int | None
    results: dict[str, Any]
    # Flattened config values that define the run (see COMPARED_SECTIONS), as text.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """Example-weighted test error, a fraction in [0, 1]."""
        return float(self.results["test"]["error"])

    @property
    def tasks(self) -> list[str]:
        return list(self.results["tasks"])


@dataclass(frozen=True)
class SkippedRun:
    """A path given to the report, or a run folder under it, that the report left out."""

    path: Path
    reason: str


def collect_runs(paths: Iterable[str | Path]) -> tuple[list[Run], list[SkippedRun]]:
    """Load every run folder under ``paths``; return the complete runs and the left-out ones.

    Each path may be a run folder, a multirun folder, any folder above them, or a
    ``results.json`` file. Paths that do not exist and folders with no run in them are
    returned as skipped, as are runs with a missing or invalid file.
    """
    runs: list[Run] = []
    skipped: list[SkippedRun] = []
    seen: set[Path] = set()
    for path in (Path(p) for p in paths):
        if not path.exists():
            skipped.append(SkippedRun(path, "not found"))
            continue
        folders = [path.parent] if path.is_file() else find_run_folders(path)
        if not folders:
            skipped.append(
                SkippedRun(path, f"no run folder ({RESULTS_FILE} or {HYDRA_CONFIG}) found in it")
            )
            continue
        for folder in folders:
            resolved = folder.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            try:
                runs.append(load_run(folder))
            except IncompleteRunError as error:
                log.warning("Leaving out %s: %s", folder, error)
                skipped.append(SkippedRun(folder, str(error)))
    return runs, skipped


def find_run_folders(root: Path) -> list[Path]:
    """Return the run folders at or below ``root`` in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        if RESULTS_FILE in filenames or (folder / HYDRA_CONFIG).is_file():
            found.append(folder)
        # Prune in place so os.walk skips hidden folders and logger output.
        dirnames[:] = sorted(
            name for name in dirnames if not name.startswith(".") and name not in _SKIPPED_FOLDERS
        )
    return sorted(found, key=_natural_key)


def load_run(folder: Path) -> Run:
    """Read one run folder; raise :class:`IncompleteRunError` saying what is missing."""
    results_path = folder / RESULTS_FILE
    if not results_path.is_file():
        raise IncompleteRunError(_missing_results_reason(folder))
    try:
        results = json.loads(results_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IncompleteRunError(
            f"{RESULTS_FILE} is unreadable or not valid JSON ({error})"
        ) from None
    if not isinstance(results, dict):
        raise IncompleteRunError(
            f"{RESULTS_FILE} contains a JSON {type(results).__name__}, not a JSON object"
        )
    _check_results(results)

    config = _load_yaml(folder / HYDRA_CONFIG)
    experiment = _experiment_name(folder, config)
    sharing = _config_value(config, ("model", "sharing"))
    if not isinstance(sharing, str) or "${" in sharing:
        raise IncompleteRunError(f"{HYDRA_CONFIG} has no plain model.sharing value")
    seed = _config_value(config, ("seed",))
    return Run(
        path=folder,
        experiment=experiment,
        sharing=sharing,
        seed=seed if isinstance(seed, int) else None,
        results=results,
        settings=run_settings(config),
    )


def run_settings(config: dict[str, Any]) -> dict[str, str]:
    """Flatten the config values that define what a run computes into ``{"a.b": text}``.

    Nested mappings such as ``model.architecture_options`` flatten to one key per leaf. Null
    values and empty mappings add no key, as if unset, so ``{}`` and ``{width: 8}`` differ in
    the key ``model.architecture_options.width`` and ``null`` equals ``{}``. Numbers compare
    by value (1 equals 1.0, also inside lists), precisions by Lightning's full name (32
    equals 32-true), and trainer keys at Lightning's default equal unset ones. With a test
    batch limit, the evaluation batch size counts, since it decides which examples are tested.
    Settings that the run's sharing mode does not use are left out (see NES_SETTINGS).
    """
    model = config.get("model")
    sharing = model.get("sharing") if isinstance(model, dict) else None
    ignored = set(IGNORED_SETTINGS)
    if sharing in FROZEN_SHARING:
        ignored |= NES_SETTINGS
    if sharing != "fixed":
        ignored.add("model.assignment")
    trainer = config.get("trainer")
    limit = trainer.get("limit_test_batches") if isinstance(trainer, dict) else None
    if limit is not None and _limit_text(limit) != "all":
        # With a limit, the evaluation batch size decides which test examples count.
        ignored.discard("data.eval_batch_size")
    settings: dict[str, str] = {}

    def add(prefix: str, value: Any) -> None:
        if prefix in ignored or value is None:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}.{key}", item)
        else:
            if prefix == "trainer.precision":
                text = _PRECISION_NAMES.get(str(value), str(value))
            elif prefix == "trainer.limit_test_batches":
                text = _limit_text(value)
            else:
                text = _value_text(value)
            if _TRAINER_DEFAULTS.get(prefix) != text:
                settings[prefix] = text

    for section in COMPARED_SECTIONS:
        if isinstance(config.get(section), dict):
            add(section, config[section])
    for dotted in COMPARED_KEYS:
        value: Any = config
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        add(dotted, value)
    return settings


def _limit_text(value: Any) -> str:
    """Describe a Lightning batch limit: an integer counts batches, a float is a fraction."""
    text = _value_text(value)
    if isinstance(value, bool):
        return text
    if isinstance(value, int) or (isinstance(value, str) and _INTEGER.fullmatch(value.strip())):
        return f"{text} batch" if text == "1" else f"{text} batches"
    if _NUMBER.fullmatch(text) or isinstance(value, float):
        return "all" if float(value) == 1.0 else f"{float(value):g} of the batches"
    return text


def _value_text(value: Any) -> str:
    """Return ``value`` as text in which equal numbers read the same (1, 1.0 and "1").

    Lists compare element by element. Integers, and strings of digits, stay exact.
    """
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(item) for item in value) + "]"
    if isinstance(value, str):
        text = value.strip()
        if _INTEGER.fullmatch(text):
            value = int(text)
        elif _NUMBER.fullmatch(text):
            value = float(text)
        else:
            return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, int):
        return str(value)
    # Whole floats below 2**53 are exact integers, so 16.0 reads as 16.
    if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _missing_results_reason(folder: Path) -> str:
    """Explain a missing ``results.json``, with the job's error when ``status.json`` has one."""
    try:
        status = json.loads((folder / STATUS_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        status = None
    if isinstance(status, dict) and status.get("status") == "failed":
        error = str(status.get("error") or "no error message").strip()
        first_line = error.splitlines()[0] if error else "no error message"
        return f"no {RESULTS_FILE}: the job failed ({first_line})"
    return f"no {RESULTS_FILE} (the job failed or has not finished)"


def _check_results(results: dict[str, Any]) -> None:
    """Raise :class:`IncompleteRunError` unless the keys that the report reads are valid."""
    for keys in (
        ("tasks",),
        ("test", "error"),
        ("test", "error_per_task"),
        ("assignment",),
        ("history",),
        ("weights", "assignment"),
        ("weights", "full_sharing"),
        ("weights", "no_sharing"),
    ):
        _require(results, keys)

    error = results["test"]["error"]
    if not _is_number(error) or not 0.0 <= error <= 1.0:
        raise IncompleteRunError(f"test.error={error!r} is not a fraction in [0, 1]")
    tasks = results["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise IncompleteRunError("tasks is not a non-empty list of task names")
    assignment = results["assignment"]
    if (
        not isinstance(assignment, list)
        or not assignment
        or any(
            not isinstance(layer, list)
            or len(layer) != len(tasks)
            or not all(isinstance(bank, int) for bank in layer)
            for layer in assignment
        )
    ):
        raise IncompleteRunError(
            f"assignment is not a [layers][tasks] list of bank indices for {len(tasks)} tasks"
        )
    history = results["history"]
    if not isinstance(history, list) or any(
        not isinstance(entry, dict)
        or not isinstance(entry.get("step"), int)
        or isinstance(entry.get("step"), bool)
        or not _is_number(entry.get("error"))
        for entry in history
    ):
        raise IncompleteRunError(
            "history is not a list of {step, error, ...} entries with an integer step and a "
            "numeric error"
        )
    per_task = results["test"]["error_per_task"]
    if not isinstance(per_task, dict) or not all(_is_number(v) for v in per_task.values()):
        raise IncompleteRunError("test.error_per_task is not a mapping of task names to errors")
    for key in ("assignment", "full_sharing", "no_sharing"):
        if not isinstance(results["weights"][key], int):
            raise IncompleteRunError(f"weights.{key} is not an integer")


def _require(mapping: dict[str, Any], keys: Sequence[str]) -> None:
    value: Any = mapping
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            name = ".".join(keys[: depth + 1])
            raise IncompleteRunError(f"{RESULTS_FILE} has no key {name!r}")
        value = value[key]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_yaml(path: Path) -> dict[str, Any]:
    """Load a Hydra YAML file without resolving interpolations such as ``${hydra:...}``."""
    if not path.is_file():
        raise IncompleteRunError(f"no {path.relative_to(path.parent.parent)}")
    try:
        container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as error:
        raise IncompleteRunError(f"{path.name} is not valid YAML ({error})") from None
    if not isinstance(container, dict):
        raise IncompleteRunError(f"{path.name} does not contain a mapping")
    return container


def _config_value(config: dict[str, Any], keys: Sequence[str]) -> Any:
    value: Any = config
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise IncompleteRunError(f"{HYDRA_CONFIG} has no key {'.'.join(keys)!r}")
        value = value[key]
    return value


def _experiment_name(folder: Path, config: dict[str, Any]) -> str:
    """Return ``experiment_name``, looking up Hydra's choice when the config interpolates it.

    The saved config keeps ``experiment_name: ${hydra:runtime.choices.experiment}`` unresolved,
    and the ``hydra:`` resolver only works inside a running Hydra app, so the choice is read
    from ``.hydra/hydra.yaml`` instead.
    """
    name = config.get("experiment_name")
    if isinstance(name, str) and "${" not in name:
        return name
    runtime = _load_yaml(folder / HYDRA_RUNTIME)
    choices = runtime.get("hydra", {}).get("runtime", {}).get("choices", {})
    if "experiment" not in choices:
        raise IncompleteRunError(
            f"the experiment name is neither in {HYDRA_CONFIG} nor in {HYDRA_RUNTIME}"
        )
    choice = choices["experiment"]
    return "(no experiment)" if choice is None else str(choice)


def _natural_key(path: Path) -> list[Any]:
    """Sort key that orders multirun job folders 2 before 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]
