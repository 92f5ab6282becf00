"""Lightning wiring of the LWS core."""

from lws_lightning.lit.module import LWSModule

__all__ = ["LWSModule"]
