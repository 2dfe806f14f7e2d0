"""Ablations: arms x seeds of one experiment as Ray Tune trials, compared with a baseline arm in a report.

:mod:`~owl2.ablate.run` loads, validates and runs an ablation (``owl2 ablate``); :mod:`~owl2.ablate.report`
turns the trials' final metrics into report.md, plots and MLflow metrics; :mod:`~owl2.ablate.stats` holds the
statistics (t-intervals over seeds, paired differences and their wording).
"""
