"""Domain code for the chest X-ray pneumonia classifier.

Nothing in this package imports ZenML: every function here can be tested
without an orchestrator, and the ZenML steps in ``steps/`` are thin wrappers.
"""

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
"""Label order: index 1 (PNEUMONIA) is the positive class everywhere."""

SPLITS = ("train", "val", "test")
