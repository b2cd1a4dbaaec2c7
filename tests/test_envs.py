"""The conda env of the pipeline rules (pipelines/envs/*.yaml) installs what CI tests, and nothing else.

CI and scripts/setup.sh install the suite with pip under requirements/constraints.txt. The env files
let conda provide only the interpreter and pip, and install the suite with pip under the same
constraints file: so they cannot name a version of their own. These tests prove it (no conda, no
network needed): every package an env file names agrees with the constraints, the constraints file
the env points to is the project's (from the env file's folder and from Snakemake's copy of it), and
every package the suite's install pulls in is pinned there.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
ENV_FILES = sorted((ROOT / "pipelines" / "envs").glob("*.yaml"))
# conda-forge names of packages whose PyPI name differs
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib", "pytorch-cpu": "torch", "pytorch-gpu": "torch"}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
            pins[canonicalize_name(name)] = version
    return pins


def _conda_spec(dep: str) -> tuple[str, str | None]:
    """'name', 'name=1.2', 'name==1.2.3', 'name 1.2.*' -> (name, version or None)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:(?:==?|\s)\s*([0-9][A-Za-z0-9_.+!*\-]*))?(?:=\S+)?\s*", dep)
    assert m, f"cannot read the conda dependency {dep!r}"
    return m.group(1), m.group(2)


def _env(path: Path) -> tuple[list[str], list[str]]:
    env = yaml.safe_load(path.read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) == 1 and list(pip[0]) == ["pip"], pip
    return conda, pip[0]["pip"]


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_names_no_version_the_constraints_do_not(path):
    pins = _constraints()
    conda, pip = _env(path)
    for dep in conda:
        name, version = _conda_spec(dep)
        pypi = canonicalize_name(CONDA_TO_PYPI.get(name, name))
        if pypi in pins:  # a package CI tests: the env must not pick its version
            assert version is not None and (version == pins[pypi] or pins[pypi].startswith(version.rstrip(".*") + ".")), \
                f"{path.name}: conda {dep!r} but requirements/constraints.txt pins {pypi}=={pins[pypi]}"
    # our policy: conda provides only the interpreter and pip, so there is nothing left to agree on
    assert sorted(_conda_spec(d)[0] for d in conda) == ["pip", "python"], conda
    for line in pip:
        if line.startswith("-"):
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name]), f"{path.name}: pip {line!r} excludes {name}=={pins[name]}"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_installs_the_suite_under_the_constraints_ci_uses(path):
    _, pip = _env(path)
    constraints = [ln.split(None, 1)[1] for ln in pip if ln.startswith("-c ")]
    suite = [ln.split(None, 1)[1] for ln in pip if ln.startswith("-e ")]
    assert len(constraints) == 1 and len(suite) == 1, pip
    target, extras = re.fullmatch(r"([^\[]+)(?:\[([^\]]*)\])?", suite[0]).groups()
    assert set(extras.split(",")) >= {"report", "track"}  # what the rules' commands import
    # conda writes the pip lines to a requirements file in the env file's folder and runs pip there;
    # Snakemake first copies the env file to .snakemake/conda/<hash>.yaml. Both must reach the project.
    for base in (path.parent, ROOT / ".snakemake" / "conda"):
        assert (base / constraints[0]).resolve() == CONSTRAINTS.resolve(), (base, constraints[0])
        assert (base / target).resolve() == ROOT, (base, target)


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_python_is_one_the_suite_supports(path):
    conda, _ = _env(path)
    version = dict(_conda_spec(d) for d in conda)["python"]
    assert version is not None, "python must be pinned (at least to a minor version)"
    requires = SpecifierSet(metadata.metadata("maskconnect")["Requires-Python"])
    assert Version(version.rstrip(".*")) in requires, (version, str(requires))


def test_every_package_the_env_installs_is_pinned_in_the_constraints():
    """Walk the installed requirement tree of maskconnect[report,track] (what the env's pip line
    installs): every distribution in it must be pinned, so pip has no version left to choose."""
    _assert_tree_pinned({"report", "track"})


def test_every_package_ci_installs_is_pinned_in_the_constraints():
    """The same for maskconnect[all], what scripts/setup.sh (hence CI) installs: the test and
    pipeline extras too."""
    _assert_tree_pinned({"all"})


def _declared() -> set[str]:
    """Distributions pyproject.toml names: the core dependencies and every extra."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: what the installed metadata says pyproject declared
        reqs = metadata.requires("maskconnect") or []
    else:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def _imported_modules(folder: Path) -> set[str]:
    """Top-level modules imported anywhere (also inside functions) by the .py files under ``folder``,
    and those named by pytest.importorskip("...")."""
    import ast

    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                names.add(str(node.args[0].value).split(".")[0])
    return names


def test_every_package_the_tests_and_benchmarks_import_is_declared():
    """A package a test imports but pyproject.toml does not declare is installed by luck (as another
    package's dependency), and a test that importorskips it would skip, not fail, without it."""
    import sys

    local = {"maskconnect", "bench"} | {p.stem for d in ("tests", "bench") for p in (ROOT / d).rglob("*.py")}
    third_party = {m for d in ("tests", "bench") for m in _imported_modules(ROOT / d)} - local
    third_party -= set(sys.stdlib_module_names) | {"__future__"}
    dists = metadata.packages_distributions()
    declared = _declared()
    undeclared = {}
    for module in sorted(third_party):
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        assert names, f"{module}: imported by the tests but not installed"
        if not names & declared:
            undeclared[module] = sorted(names)
    assert {"torch", "mlflow", "psutil", "scipy", "yaml"} <= third_party  # the walk sees the imports
    assert not undeclared, f"imported by tests/ or bench/ but not declared in pyproject.toml: {undeclared}"


def _assert_tree_pinned(extras: set[str]) -> None:
    pins = _constraints()
    seen: set[str] = set()
    missing: set[str] = set()
    todo = [("maskconnect", frozenset(extras))]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (a marker excluded it on this platform)
        if key != "maskconnect" and key not in pins:
            missing.add(key)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    assert len({k for k, _ in seen}) > 30  # torch, mlflow and the report stack pull in many
    assert not missing, f"not pinned in requirements/constraints.txt: {sorted(missing)}"
