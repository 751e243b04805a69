"""Services around the pipeline: the team stack and the ZenML stack a run uses."""
