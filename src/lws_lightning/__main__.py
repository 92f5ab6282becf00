"""Command line: ``python -m lws_lightning [experiment=NAME] [overrides...]``."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from lws_lightning.errors import UserInputError

log = logging.getLogger("lws_lightning")


@hydra.main(version_base="1.3", config_path="pkg://lws_lightning.conf", config_name="config")
def _run(cfg: DictConfig) -> float:
    from lws_lightning.run import train

    try:
        results = train(cfg)
    except UserInputError as error:
        log.error("%s", error)
        sys.exit(2)
    return results["test"]["error"]


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
