"""Registry: versions in MLflow and the way to champion (tracking, card, gate: the pure rule, store: MLflow I/O,
promotion: the workflow, the only module using both gate and store). May use every stage below it."""
