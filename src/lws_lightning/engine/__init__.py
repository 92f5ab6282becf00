"""Training engines: how the losses of sampled assignments are computed."""

from lws_lightning.engine.batched import BatchedEngine
from lws_lightning.engine.literal import LiteralEngine, assignment_loss
from lws_lightning.engine.step import Engine, StepConfig, StepResult, lws_step

ENGINES: dict[str, type] = {"batched": BatchedEngine, "literal": LiteralEngine}


def build_engine(name: str) -> Engine:
    """Return the engine called ``name``."""
    if name not in ENGINES:
        choices = ", ".join(sorted(ENGINES))
        raise ValueError(f"model.engine={name!r} is unknown; choose one of: {choices}.")
    return ENGINES[name]()


__all__ = [
    "ENGINES",
    "BatchedEngine",
    "Engine",
    "LiteralEngine",
    "StepConfig",
    "StepResult",
    "assignment_loss",
    "build_engine",
    "lws_step",
]
