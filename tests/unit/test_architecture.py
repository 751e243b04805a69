"""The shape of xray/ (docs/ARCHITECTURE.md): stages in one order, imports at the top, small modules, one repository
root, and a cache key that follows every stage's code."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from xray.environment import REPO_ROOT

PACKAGE = ROOT / "xray"
STAGES = ("storage", "data", "model", "evaluation", "monitoring", "serving", "registry")
# What may stay a function-level import, and why: each takes seconds to import, is optional, or (pydicom) is paid
# only where a DICOM file arrives, or (openvino) only where that runtime runs.
LAZY = {"tensorflow", "keras", "mlflow", "botocore", "boto3", "moto", "kagglehub", "pydicom", "openvino"}


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def function_level_imports(path: Path):
    """(module, the import's line and the line above it) of every import inside a function."""
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    name = inner.module if isinstance(inner, ast.ImportFrom) else inner.names[0].name
                    yield name or "", "\n".join(lines[max(inner.lineno - 2, 0) : inner.lineno])


def test_function_level_imports_are_heavy_third_party_ones_that_say_why():
    found = []
    for path in modules():
        for name, line in function_level_imports(path):
            if name.split(".")[0] not in LAZY or "# lazy:" not in line:
                found.append(f"{path.relative_to(ROOT)}: {line.splitlines()[-1].strip()}")
    assert not found, "import these at the top of the module (or say why not with '# lazy: ...'):\n" + "\n".join(found)


def test_stages_are_subpackages_of_at_most_six_modules_none_over_450_lines():
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)
    for stage in STAGES:
        own = [p for p in (PACKAGE / stage).glob("*.py") if p.name != "__init__.py"]
        assert 1 <= len(own) <= 6, f"xray/{stage} has {len(own)} modules"
    # A stage may hold a subpackage (monitoring/performance/): the same cap, and a docstring saying what it is.
    for package in (p.parent for p in PACKAGE.glob("*/*/__init__.py")):
        own = [p for p in package.glob("*.py") if p.name != "__init__.py"]
        assert 1 <= len(own) <= 6, f"{package.relative_to(ROOT)} has {len(own)} modules"
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), f"{package} says what it is"
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def test_one_repository_root_for_the_paths_beside_the_code():
    from steps import caching
    from xray.registry.tracking import DEFAULT_STORE
    from xray.storage.sources import SHARED_ARCHIVE

    assert (REPO_ROOT / "xray" / "__init__.py").is_file() and REPO_ROOT == ROOT
    assert DEFAULT_STORE == REPO_ROOT / ".mlflow"
    assert SHARED_ARCHIVE == REPO_ROOT.parent / "shared" / "data" / "chest_xray_224.zip"
    assert caching.ROOT == REPO_ROOT


def test_the_cache_key_follows_code_inside_every_stage(tmp_path, monkeypatch):
    from steps import caching

    for relative in ("xray/__init__.py", "xray/data/images.py", "xray/registry/store.py", "materializers/a.py"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x = 1\n")
    monkeypatch.setattr(caching, "ROOT", tmp_path)
    keys = [caching.domain_code_hash()]
    (tmp_path / "xray/data/images.py").write_text("x = 2\n")  # a change inside a stage
    keys.append(caching.domain_code_hash())
    (tmp_path / "xray/data/images.py").rename(tmp_path / "xray/registry/images.py")  # the same file, moved
    keys.append(caching.domain_code_hash())
    assert len(set(keys)) == 3


def _contract_config() -> str:
    """pyproject's import-linter section for xray alone (the other root packages are not copied)."""
    import tomllib

    section = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = [c for c in section["contracts"] if c["type"] != "layers" or c.get("containers") == ["xray"]]
    lines = ["[importlinter]", "root_package = xray", "include_external_packages = True", ""]
    for index, contract in enumerate(contracts):
        lines.append(f"[importlinter:contract:{index}]")
        for key, value in contract.items():
            if isinstance(value, list):
                value = "\n    " + "\n    ".join(value)
            lines.append(f"{key} = {value}")
        lines.append("")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, line, broken",
    [
        (None, None, None),
        ("xray/data/images.py", "from xray.registry import store", "xray.data is not allowed to import xray.registry"),
        (
            "xray/storage/s3.py",
            "from xray.storage import fetch",
            "no import cycle between the modules of a stage BROKEN",
        ),
        ("xray/config.py", "import zenml", "the domain imports no orchestration BROKEN"),
    ],
)
def test_make_lint_refuses_a_back_edge_a_cycle_and_orchestration_in_the_domain(tmp_path, module, line, broken):
    """The contracts of make lint on a copy of xray/, as it is and with one import added inside a function."""
    shutil.copytree(PACKAGE, tmp_path / "xray", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / ".importlinter").write_text(_contract_config())
    if module:
        with open(tmp_path / module, "a") as handle:
            handle.write(f"\n\ndef _added():\n    {line}  # noqa\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
    )
    if broken is None:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    else:
        assert result.returncode != 0 and broken in result.stdout, result.stdout[-2000:]
