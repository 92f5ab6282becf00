"""Command line: ``python -m lws_lightning [experiment=NAME] [overrides...]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lws_lightning import sigterm


@hydra.main(version_base="1.3", config_path="pkg://lws_lightning.conf", config_name="config")
def _run(cfg: DictConfig) -> float | None:
    # Before the imports below, which take seconds: a SIGTERM then still gets a status file.
    sigterm.remember()
    from lws_lightning.jobs import run_job
    from lws_lightning.run import train

    return run_job(cfg, train)


def main() -> None:
    # From the start, so that a SIGTERM while Hydra prepares the run folder is not lost.
    sigterm.remember()
    _run()


if __name__ == "__main__":
    main()
