"""Evaluation: calibration, metrics with confidence intervals, figures and the recipes that measure held-out images.
May use core, storage, data and model."""
