"""The rules import-linter cannot state for folders that are not packages (``make lint``; issue #41):

- nothing outside ``tests/`` imports from ``tests/`` (its helpers, or ``tests`` on ``sys.path``): what scripts and
  benchmarks share with the tests lives in a package (``fixtures/``);
- nothing outside ``benchmarks/`` imports a benchmark (or puts ``benchmarks`` on ``sys.path``).

Usage: ``python3 scripts/check_boundaries.py [ROOT]``; prints one ``path:line: why`` per breach, exits 1 if any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SKIPPED = {".venv", ".git", ".cache", "outputs", "node_modules", ".mlflow", ".zenml", ".team", ".pacs", ".node"}


def python_files(root: Path):
    for path in sorted(root.rglob("*.py")):
        if not SKIPPED.intersection(path.relative_to(root).parts):
            yield path


def guarded(root: Path, folder: str) -> set[str]:
    """The top-level module names that stand for ``folder``: the folder itself and each of its modules."""
    return {folder} | {path.stem for path in (root / folder).glob("*.py")} - {"__init__"}


def breaches(root: Path) -> list[str]:
    rules = {folder: guarded(root, folder) for folder in ("tests", "benchmarks")}
    found = []
    for path in python_files(root):
        where = path.relative_to(root).parts[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                folder = node.value.strip("/").split("/")[-1]
                if folder in rules and where != folder and _on_path(tree, node):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: puts {folder}/ on sys.path")
                continue
            for name in names:
                top = name.split(".")[0]
                for folder, modules in rules.items():
                    if where != folder and top in modules:
                        found.append(f"{path.relative_to(root)}:{node.lineno}: imports {name} from {folder}/")
    return sorted(found, key=lambda line: (line.split(":")[0], int(line.split(":")[1])))


def _on_path(tree: ast.AST, constant: ast.Constant) -> bool:
    """Whether ``constant`` is part of a statement that changes ``sys.path``."""
    for statement in ast.walk(tree):
        if isinstance(statement, (ast.Assign, ast.Expr, ast.AugAssign)) and "sys.path" in ast.unparse(statement):
            if any(node is constant for node in ast.walk(statement)):
                return True
    return False


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
    found = breaches(root)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
