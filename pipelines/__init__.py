"""The project's ZenML pipelines, one module per job (``pipelines.training``, ``pipelines.inference``, ...), each with
its ``run_<job>`` and summary; ``launch`` starts them.

The package imports none of them itself: a job's command (``run.py approve``, ``run.py audit``) imports only what it
runs, and TensorFlow is loaded only by the jobs that need it."""
