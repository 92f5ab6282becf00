"""W&B offline runs of the session multirun, failed-job marking, and the routing-figure callback."""

from __future__ import annotations

import csv
import json
import logging
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lws_lightning.lit.callbacks import ASSIGNMENT_KEY, PROBS_KEY, RoutingFigureLogger
from lws_lightning.lit.loggers import WANDB_RUN_ID_KEY, resume_wandb_run, run_name
from lws_lightning.lit.module import GENERATOR_STATE_KEY, LWSModule
from lws_lightning.run import _continue_wandb_run
from tests.conftest import Multirun

TASKS = ("fashion", "digits", "optdigits")
# Keys that every job's W&B history must hold: losses, π's entropy, test errors, figures.
LOGGED_KEYS = (
    "train/loss",
    "routing/entropy",
    *(f"routing/entropy/layer_{layer}" for layer in range(4)),
    "val/error",
    "test/error",
    "test/error_task_mean",
    *(f"test/error/{task}" for task in TASKS),
    f"{PROBS_KEY}/_type",
    f"{ASSIGNMENT_KEY}/_type",
)


def read_wandb_records(path: Path) -> list[Any]:
    """Decode the records of a W&B transaction log (``run-<id>.wandb``).

    The file starts with W&B's 7-byte header (``:W&B``, magic 0xBEE1, version 0). LevelDB's
    log format follows: 32 KiB blocks of chunks, each with a 7-byte header of CRC-32C,
    little-endian length and type. Type 1 is a whole record, and types 2, 3 and 4 are the
    first, middle and last pieces of one. Each record is a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block_size, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block_size - position % block_size < 7:
            position += block_size - position % block_size
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run_summary(job_dir: Path) -> dict[str, Any]:
    """Return the run fields, history keys and exit code of the one W&B run in ``job_dir``."""
    logs = sorted((job_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"expected one W&B run in {job_dir}, found {logs}"
    summary: dict[str, Any] = {"keys": set(), "exit_code": None, "images": set()}
    for record in read_wandb_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            summary["id"] = record.run.run_id
            summary["group"] = record.run.run_group
            summary["job_type"] = record.run.job_type
            summary["name"] = record.run.display_name
        elif kind == "history":
            summary["keys"] |= {
                "/".join(item.nested_key) or item.key for item in record.history.item
            }
        elif kind == "exit":
            summary["exit_code"] = record.exit.exit_code
    summary["images"] = {path.name for path in logs[0].parent.glob("files/media/images/**/*.png")}
    return summary


def tiny_module() -> LWSModule:
    return LWSModule(
        architecture="dkl_convnet",
        num_classes=[3, 4],
        input_shape=(1, 8, 8),
        num_banks=2,
        task_names=["left", "right"],
        architecture_options={"width": 2, "hidden": 4},
    )


def fake_trainer(loggers: list[Any], step: int = 7) -> SimpleNamespace:
    return SimpleNamespace(
        loggers=loggers, sanity_checking=False, is_global_zero=True, global_step=step
    )


def test_wandb_run_per_job(lws_multirun):
    summaries = {key: wandb_run_summary(job) for key, job in lws_multirun.jobs.items()}

    assert len({summary["id"] for summary in summaries.values()}) == len(summaries)
    for key, summary in summaries.items():
        assert summary["group"] == "mnist_trio_convnet", key
        assert summary["job_type"] == "train", key
        assert summary["exit_code"] == 0, key
        missing = set(LOGGED_KEYS) - summary["keys"]
        assert not missing, f"{key} lacks {sorted(missing)}"
        assert len(summary["images"]) == 2, f"{key}: expected a π image at steps 2 and 4"
    for sharing in ("learned", "full", "none"):
        seed_0, seed_1 = summaries[(sharing, 0)], summaries[(sharing, 1)]
        assert seed_0["name"] == seed_1["name"]
        assert f"model.sharing={sharing}" in seed_0["name"]
        assert "seed=" not in seed_0["name"]
        assert "paths." not in seed_0["name"]


def test_tensorboard_run_per_job(lws_multirun):
    for key, job_dir in lws_multirun.jobs.items():
        events = EventAccumulator(str(job_dir / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        tags = events.Tags()
        for scalar in ("train/loss", "routing/entropy/layer_3", "test/error", "test/error/digits"):
            assert scalar in tags["scalars"], f"{key} lacks {scalar}"
        steps = [image.step for image in events.Images(PROBS_KEY)]
        assert steps == [2, 4], key
        assert [event.step for event in events.Scalars("val/error")] == [2, 4], key
        assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4], key


def test_csv_steps_count_finished_iterations(lws_multirun):
    """metrics.csv labels each metric by finished iterations, as results.json's history does."""
    for key, job_dir in lws_multirun.jobs.items():
        with (job_dir / "csv" / "metrics.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        history = json.loads((job_dir / "results.json").read_text())["history"]

        def steps(metric: str, rows: list[dict[str, str]] = rows) -> list[int]:
            return [int(row["step"]) for row in rows if row.get(metric)]

        assert steps("val/error") == [entry["step"] for entry in history] == [2, 4], key
        assert steps("train/loss") == [1, 2, 3, 4], key
        assert steps("test/error") == [4], key


def tiny_wandb_overrides(multirun: Multirun) -> tuple[str, ...]:
    """Overrides of a run of a few seconds that logs to W&B and evaluates after every step."""
    return (
        "debug=smoke",
        "logger=wandb",
        f"paths.data_dir={multirun.data_dir}",
        "data.download=false",
        "data.eval_batch_size=64",
        "trainer.val_check_interval=1",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "model.nes_samples=2",
        "model.sgd_samples=1",
        "callbacks.progress_bar.refresh_rate=0",
    )


def test_wandb_failed_job_exits_1(compose_config, tmp_path, monkeypatch, lws_multirun):
    from lws_lightning import run

    for name, value in lws_multirun.wandb_env.items():
        monkeypatch.setenv(name, value)
    cfg = compose_config(*tiny_wandb_overrides(lws_multirun), "trainer.max_steps=1")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected failure after testing")

    monkeypatch.setattr(run, "collect_results", fail)
    Path(cfg.paths.output_dir).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        run.train(cfg)

    import wandb

    assert wandb.run is None, "the failed job left its W&B run open"
    # wandb-core writes the log in a separate process and may append the exit record after
    # finish() returns, so poll for it.
    deadline = time.monotonic() + 30
    summary = wandb_run_summary(Path(cfg.paths.output_dir))
    while summary["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
        summary = wandb_run_summary(Path(cfg.paths.output_dir))
    assert summary["exit_code"] == 1
    assert "test/error" in summary["keys"]


def test_resumed_run_continues_wandb_run(compose_config, tmp_path, monkeypatch, lws_multirun):
    """A run resumed from last.ckpt logs into the W&B run whose id the checkpoint stores."""
    from lws_lightning.run import train

    for name, value in lws_multirun.wandb_env.items():
        monkeypatch.setenv(name, value)
    common = tiny_wandb_overrides(lws_multirun)
    first_cfg = compose_config(*common, "trainer.max_steps=1")
    train(first_cfg)
    first_dir = Path(first_cfg.paths.output_dir)
    checkpoint = torch.load(first_dir / "last.ckpt", weights_only=False)

    resumed_dir = tmp_path / "resumed"
    resumed_cfg = compose_config(
        *common,
        "trainer.max_steps=2",
        f"ckpt_path={first_dir / 'last.ckpt'}",
        f"paths.output_dir={resumed_dir}",
    )
    train(resumed_cfg)

    first = wandb_run_summary(first_dir)
    resumed = wandb_run_summary(resumed_dir)
    assert checkpoint[WANDB_RUN_ID_KEY] == first["id"]
    assert resumed["id"] == first["id"]
    assert "val/error" in resumed["keys"]


def test_explicit_wandb_id_wins_over_checkpoint(compose_config):
    """resume_wandb_run leaves a W&B node alone when the user set its id or version."""
    cfg = compose_config("logger=[csv,wandb]", "logger.wandb.id=chosen")
    assert not resume_wandb_run(cfg.logger, "from-checkpoint")
    assert cfg.logger.wandb.id == "chosen"
    cfg = compose_config("logger=wandb", "+logger.wandb.version=chosen")
    assert not resume_wandb_run(cfg.logger, "from-checkpoint")
    assert cfg.logger.wandb.id is None
    cfg = compose_config("logger=[csv,wandb]")
    assert resume_wandb_run(cfg.logger, "from-checkpoint")
    assert cfg.logger.wandb.id == "from-checkpoint"
    assert "id" not in cfg.logger.csv


def test_sweep_job_starts_own_wandb_run(compose_config, caplog):
    """In a multirun, jobs resumed from one checkpoint do not share its W&B run."""
    cfg = compose_config("logger=wandb", "hydra.mode=MULTIRUN")
    assert HydraConfig.get().mode == RunMode.MULTIRUN

    with caplog.at_level(logging.INFO, logger="lws_lightning.run"):
        _continue_wandb_run(cfg, "from-checkpoint")

    assert cfg.logger.wandb.id is None
    assert "this sweep job starts a run of its own" in caplog.text


def test_wandb_id_kept_without_wandb():
    """A checkpoint written without W&B keeps the W&B run id of the one it resumed from."""
    module = LWSModule("dkl_convnet", [2], (1, 28, 28), architecture_options={"width": 4})
    module.on_load_checkpoint(
        {GENERATOR_STATE_KEY: module.generator.get_state(), WANDB_RUN_ID_KEY: "earlier"}
    )
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[WANDB_RUN_ID_KEY] == "earlier"


def test_run_name_excludes_seed_and_paths():
    overrides = ["seed=3", "paths.log_dir=/tmp/x", "model.sharing=full", "+trainer.limit=2"]
    assert run_name(overrides) == "+trainer.limit=2,model.sharing=full"
    assert run_name(["seed=1", "logger=wandb", "experiment_name=a"]) == "default"
    assert run_name(["model.lr=0.1"], exclude=["model.*"]) == "default"


def test_callback_noop_without_logger():
    module = SimpleNamespace()  # any attribute access would raise AttributeError
    callback = RoutingFigureLogger()
    callback.on_validation_end(fake_trainer([]), module)
    callback.on_validation_end(fake_trainer([CSVLogger("unused")]), module)


def test_callback_tensorboard_image(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    module = tiny_module()
    with torch.no_grad():
        module.distribution.probs[0, 1] = torch.tensor([0.2, 0.8], dtype=torch.float64)

    RoutingFigureLogger().on_validation_end(fake_trainer([logger], step=7), module)
    logger.finalize("success")

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (image,) = events.Images(PROBS_KEY)
    assert image.step == 7
    assert image.width >= 200
    assert image.height >= 100
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    (text,) = events.Tensors(f"{ASSIGNMENT_KEY}/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "| task | layer_0 | layer_1 | layer_2 | layer_3 |" in table
    assert "| right | 1 | 0 | 0 | 0 |" in table
