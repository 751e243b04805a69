"""Scratch folders for the files behind a step's output.

A step's outputs are stored by their materializers after the step function returns, so the files they point to must
outlive the function, and no more: a folder per run that nobody removes fills the disk of a machine that retrains on
a schedule (a dataset's images, a downloaded archive).
"""

from pathlib import Path

from zenml import get_step_context


def output_folder(output_name: str) -> Path:
    """A new folder for the files behind output ``output_name``, removed by ZenML once the step has ended and its
    outputs are stored (``BaseMaterializer.get_temporary_directory`` with ``delete_at_exit=False``)."""
    materializer = get_step_context().get_output_materializer(output_name)
    with materializer.get_temporary_directory(delete_at_exit=False) as folder:
        return Path(folder)
