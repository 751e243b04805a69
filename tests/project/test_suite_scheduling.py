"""The suite's own scheduling (tests/conftest.py, support.SHARED_WORKER): the files it keeps on one worker exist and
do share the session fixture they are kept together for, so that a renamed file or a fixture no longer shared cannot
leave a rule that silently does nothing."""

import ast
from pathlib import Path

from support import ROOT, SHARED_WORKER

SHARED_FIXTURE = "local"  # tests/pipelines/conftest.py: the local stack's smoke training


def requested(test_file: Path) -> set[str]:
    """Every fixture name the file's tests request, directly or through the fixtures of the file and its conftest."""
    functions = {}
    for path in (test_file.parent / "conftest.py", test_file):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                functions[node.name] = {argument.arg for argument in node.args.args}
    found = set().union(*(names for name, names in functions.items() if name.startswith("test_")))
    while more := set().union(*(functions.get(name, set()) for name in found)) - found:
        found |= more
    return found


def test_the_files_kept_on_one_worker_exist_and_share_the_fixture():
    assert SHARED_WORKER
    for joined, unit in SHARED_WORKER.items():
        for path in (ROOT / unit, ROOT / joined):
            assert path.is_file(), path
            assert SHARED_FIXTURE in requested(path), path
