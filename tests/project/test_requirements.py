"""requirements.lock is the exact set CI installs, and it satisfies every range in requirements*.txt."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support import ROOT


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith(("#", " ", "-")):
            name, pinned = line.split("==")
            pins[canonicalize_name(name)] = pinned.strip()
    return pins


def _ranges(path: Path) -> list[Requirement]:
    found = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            found += _ranges(path.parent / line[3:].strip())
        else:
            found.append(Requirement(line))
    return found


def test_the_lock_satisfies_every_declared_range():
    pins = _pins()
    for requirement in _ranges(ROOT / "requirements-dev.txt"):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared but not in requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def test_this_environment_is_the_lock():
    mismatched = {}
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            mismatched[name] = (pinned, installed)
    assert not mismatched, f"installed set differs from requirements.lock (pinned, installed): {mismatched}"


def test_directly_imported_packages_are_declared():
    declared = {canonicalize_name(r.name) for r in _ranges(ROOT / "requirements.txt")}
    assert {"keras", "numpy", "croniter", "tensorflow-cpu", "zenml", "mlflow", "moto", "pyarrow"} <= declared
