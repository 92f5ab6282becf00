"""Command line: ``python -m lws_lightning [experiment=NAME] [overrides...]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://lws_lightning.conf", config_name="config")
def _run(cfg: DictConfig) -> float | None:
    from lws_lightning.jobs import run_job
    from lws_lightning.run import train

    return run_job(cfg, train)


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
