"""Monitoring: is the input still like the training data, and is the model still right? Per-image
out-of-distribution and scope checks, batch drift tests and synthetic shifts, the report, the alerts posted to the
on-call webhook, the prediction log, and performance from labels that come back (feedback) or estimated before they
do. May use core, storage, data, model and evaluation."""
