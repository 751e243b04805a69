"""The config: one validated model for every knob of the pipeline, a module per top-level key of ``configs/*.yaml``.
A key ``<section>.<field>`` (a YAML key, an MLflow param, a message) is defined in ``xray/config/<section>.py``;
``PipelineConfig`` and the top-level fields in ``pipeline.py``; what reading may cost (``data.limits``,
``inference.decode``, ``inference.pacs``) in ``limits.py``; the sections' base and helpers in ``base.py``.
Core: uses no other module of xray. Reading a YAML file into it is ``xray.config_file``."""
