"""Monitoring: is the input still like the training data? Per-image out-of-distribution checks, batch drift tests,
the report, synthetic shifts. May use core, storage, data, model and evaluation."""
