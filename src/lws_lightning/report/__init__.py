"""Tables and figures over finished runs; ``python -m lws_lightning.report`` writes them all.

The package imports nothing on its own, so that training, which draws the assignment picture,
does not load SciPy; import ``lws_lightning.report.build`` for :func:`write_report`.
"""
