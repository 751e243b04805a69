"""The shape of xray/ (docs/ARCHITECTURE.md): stages in one order, imports at the top, small modules, a module table
that is the tree, the config's sections in the modules of their keys, one repository root, and a cache key that
follows every stage's code."""

import ast
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from support import ROOT
from xray.environment import REPO_ROOT

PACKAGE = ROOT / "xray"
STAGES = ("storage", "data", "model", "evaluation", "monitoring", "serving", "registry")
# Subpackages of core: not stages (no import order among them and the stages), each with its own rule.
CORE_PACKAGES = ("config",)
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# What may stay a function-level import, and why: each takes seconds to import, is optional, or (pydicom) is paid
# only where a DICOM file arrives, or (openvino, nncf) only where that runtime runs or is made, or (werkzeug, which
# moto[server] brings) only where the embedded S3 endpoint is served, or (sklearn, a second) only where a detector
# or a calibration is fitted or a reference profile is loaded, not by the DICOM node's build processes, which import
# the serving and monitoring stages for their names.
LAZY = {"tensorflow", "keras", "mlflow", "botocore", "boto3", "moto", "kagglehub", "pydicom", "openvino", "nncf"}
LAZY |= {"werkzeug", "sklearn"}


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def function_level_imports(path: Path):
    """(module, the import's line and the line above it) of every import inside a function."""
    lines = path.read_text().splitlines()
    tree = ast.parse(path.read_text())
    # A package's module-level __getattr__ (PEP 562) is an import on first use by definition: xray/serving's gives
    # MLflow the pyfunc loader that versions registered before the stages name.
    shims = {node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node not in shims:
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
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert subpackages == sorted(STAGES + CORE_PACKAGES)
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


def table_and_tree(text: str) -> tuple[set[str], set[str]]:
    """The modules ARCHITECTURE.md's stage table lists and those of xray/, as paths below xray/ without ``.py``
    (``errors``, ``config/base``, ``storage/s3``). A row names ``core`` (xray/'s own modules) or its folder in
    backticks (``storage/``, core: ``config/``); its last cell is backticked names only, ``sub/module`` for a
    subpackage's."""
    section = text.split("## The stages of `xray/`\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # past the header and its rule
    listed: list[str] = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        stage, names = cells[0], cells[-1]
        folder = re.fullmatch(r"core|(?:core: )?`(\w+)/`", stage)
        assert folder, f"a row's first cell is core or a `folder/`, not {stage!r}"
        assert re.fullmatch(r"`[\w/]+`(, `[\w/]+`)*", names), f"{stage}: modules are `name`, `name`, ...: {names!r}"
        prefix = f"{folder.group(1)}/" if folder.group(1) else ""
        listed += [prefix + name for name in re.findall(r"`([\w/]+)`", names)]
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    tree = {p.relative_to(PACKAGE).with_suffix("").as_posix() for p in modules() if p.name != "__init__.py"}
    return set(listed), tree


def test_the_architecture_table_lists_every_module_of_xray_and_nothing_else():
    listed, tree = table_and_tree(ARCHITECTURE.read_text())
    assert {name.split("/")[0] for name in listed if "/" in name} >= set(STAGES + CORE_PACKAGES)
    assert not tree - listed, f"docs/ARCHITECTURE.md's stage table misses {sorted(tree - listed)}"
    assert not listed - tree, (
        f"docs/ARCHITECTURE.md's stage table lists modules that do not exist: {sorted(listed - tree)}"
    )


def test_a_stale_architecture_table_is_caught():
    """A module merged away but still listed, and a new one not listed yet (what went stale before the test)."""
    stale = ARCHITECTURE.read_text().replace("`alerts`, `prediction_log`", "`alerts`, `shifts`")
    listed, tree = table_and_tree(stale)
    assert tree - listed == {"monitoring/prediction_log"} and listed - tree == {"monitoring/shifts"}
    with pytest.raises(AssertionError, match="modules are"):
        table_and_tree(stale.replace("`network`, `training`", "network.py, `training`"))


def _sections(annotation) -> set[type]:
    """The config sections among the types of a field (through Optional, tuples and mappings)."""
    from xray.config.base import Section

    found, pending = set(), [annotation]
    while pending:
        kind = pending.pop()
        pending += typing.get_args(kind)
        if isinstance(kind, type) and issubclass(kind, Section):
            found.add(kind)
    return found


def test_each_config_section_is_defined_in_the_module_named_after_its_key():
    """``train.batch_size`` is in xray/config/train.py: each top-level section's class (and the sections inside it,
    but for the limits) comes from the module of its key, and each module of config/ but base, limits and pipeline is
    one key's. The package's __init__ is a docstring only: every name is imported from where it is defined."""
    from xray.config.pipeline import PipelineConfig

    keys = set()
    for key, field in PipelineConfig.model_fields.items():
        pending = list(_sections(field.annotation))
        keys |= {key} if pending else set()
        while pending:
            section = pending.pop()
            if section.__module__ != "xray.config.limits":
                assert section.__module__ == f"xray.config.{key}", f"{key}: {section.__name__} in {section.__module__}"
                pending += [kind for f in section.model_fields.values() for kind in _sections(f.annotation)]
    own = {p.stem for p in (PACKAGE / "config").glob("*.py")} - {"__init__", "base", "limits", "pipeline"}
    assert own == keys, f"modules of config/ that are not one key's: {sorted(own - keys)}; keys without: {keys - own}"
    body = ast.parse((PACKAGE / "config" / "__init__.py").read_text()).body
    assert [type(node) for node in body] == [ast.Expr], "xray/config/__init__.py holds its docstring only"


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

    def about_xray(contract: dict) -> bool:  # the modules it constrains are xray's (what it forbids may be anything)
        names = [n for key in ("containers", "source_modules", "modules", "ancestors") for n in contract.get(key, [])]
        return bool(names) and all(n == "xray" or n.startswith("xray.") for n in names)

    contracts = [contract for contract in section["contracts"] if about_xray(contract)]
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
        ("xray/config/pipeline.py", "import zenml", "the domain imports no orchestration BROKEN"),
        ("xray/config/data.py", "from xray.config import model", "xray.config.data is not allowed to import"),
        ("xray/config/base.py", "from xray.config import limits", "xray.config.base is not allowed to import"),
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


def test_nothing_outside_tests_imports_tests_and_nothing_imports_a_benchmark(tmp_path):
    """scripts/check_boundaries.py (make lint) passes on the tree and names each planted breach by file and line."""
    script = ROOT / "scripts" / "check_boundaries.py"
    clean = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    assert clean.returncode == 0 and clean.stdout == "", clean.stdout
    for folder, text in {
        "tests": "import conftest\n",
        "benchmarks": "def run():\n    pass\n",
        "fixtures": "",
        "scripts": 'import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).parent / "tests"))\n'
        "from dicom_tools import x\n",
        "xray": "from bench import record\n",
        "steps": "import benchmarks.bench\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{folder}_code.py").write_text(text)
    (tmp_path / "tests" / "dicom_tools.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "bench.py").write_text("from benchmarks_code import run\n")  # its own: allowed
    planted = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert planted.returncode == 1
    assert planted.stdout.splitlines() == [
        "scripts/scripts_code.py:3: puts tests/ on sys.path",
        "scripts/scripts_code.py:4: imports dicom_tools from tests/",
        "steps/steps_code.py:1: imports benchmarks.bench from benchmarks/",
        "xray/xray_code.py:1: imports bench from benchmarks/",
    ]
