"""CI cannot go green by skipping: `.ci/run` fails when the SLURM cluster of test_slurm.py
cannot be installed, and tells that test, and the mount-namespace tests of test_faults.py, to fail rather
than skip; `scripts/setup.sh` fails when pip fails. Both scripts run here for real, in a scratch project, against stub commands (id, apt-get, the
SLURM binaries, the venv's python, the test suite), so nothing is installed and no suite runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def ci(tmp_path):
    """A scratch project holding .ci/run, a stub scripts/test.sh that records that it ran (and the
    variables CI gives the tests), and a PATH of the few real tools .ci/run needs plus stubs."""
    proj = tmp_path / "proj"
    (proj / ".ci").mkdir(parents=True)
    (proj / "scripts").mkdir()
    shutil.copy(ROOT / ".ci" / "run", proj / ".ci" / "run")
    mark = tmp_path / "suite-ran"
    _stub(proj / "scripts" / "test.sh",
          f'echo "REQUIRE=$MASKCONNECT_REQUIRE_SLURM NS=$MASKCONNECT_REQUIRE_NAMESPACES" > "{mark}"')
    sysbin, stubs = tmp_path / "sysbin", tmp_path / "stubs"
    sysbin.mkdir()
    stubs.mkdir()
    for tool in ("bash", "sh", "dirname", "nproc", "python3", "cat"):
        (sysbin / tool).symlink_to(shutil.which(tool))
    _stub(stubs / "id", 'if [ "$1" = -u ]; then echo "$FAKE_UID"; else exit 1; fi')
    apt_log = tmp_path / "apt.log"

    def run(uid: int, *, slurm: bool, apt: int | None, env: dict | None = None):
        """``slurm``: the SLURM binaries are installed; ``apt``: apt-get's exit status (None: no
        apt-get); a successful apt-get installs the binaries."""
        for b in SLURM_BINARIES:
            (stubs / b).unlink(missing_ok=True)
            if slurm:
                _stub(stubs / b, "exit 0")
        (stubs / "apt-get").unlink(missing_ok=True)
        if apt is not None:
            install = "".join(f'printf "#!/bin/sh\\n" > "{stubs / b}"; chmod +x "{stubs / b}"; ' for b in SLURM_BINARIES)
            _stub(stubs / "apt-get", f'echo "$@" >> "{apt_log}"\n'
                                     f'if [ "$1" = install ] && [ {apt} = 0 ]; then {install}fi\nexit {apt}')
        full = {"PATH": f"{stubs}:{sysbin}", "FAKE_UID": str(uid), "HOME": str(tmp_path), **(env or {})}
        r = subprocess.run(["bash", str(proj / ".ci" / "run")], env=full, capture_output=True, text=True, timeout=60)
        ran = mark.read_text().strip() if mark.exists() else None
        mark.unlink(missing_ok=True)
        log = apt_log.read_text() if apt_log.exists() else ""
        apt_log.unlink(missing_ok=True)
        return r, ran, log

    return run


def test_ci_without_root_fails_before_the_suite(ci):
    r, ran, _ = ci(1000, slurm=True, apt=0)
    assert r.returncode == 1 and ran is None
    assert "needs root" in r.stderr and "MASKCONNECT_REQUIRE_SLURM=0" in r.stderr


def test_ci_that_cannot_install_slurm_fails_before_the_suite(ci):
    r, ran, log = ci(0, slurm=False, apt=100)
    assert r.returncode == 1 and ran is None, r.stderr
    assert "failed" in r.stderr and "slurmctld" in r.stderr
    r, ran, _ = ci(0, slurm=False, apt=None)  # no apt-get at all
    assert r.returncode == 1 and ran is None and "no apt-get" in r.stderr


def test_ci_installs_missing_slurm_and_requires_the_cluster(ci):
    r, ran, log = ci(0, slurm=False, apt=0)
    assert r.returncode == 0, r.stderr
    assert "install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge" in log
    assert ran == "REQUIRE=1 NS=1"  # test_slurm.py (no cluster) and test_faults.py (no namespaces) fail, not skip


def test_ci_with_slurm_installed_does_not_touch_apt(ci):
    r, ran, log = ci(0, slurm=True, apt=0)
    assert r.returncode == 0 and ran == "REQUIRE=1 NS=1" and log == "", r.stderr


def test_ci_opt_out_is_explicit_and_said(ci):
    r, ran, log = ci(1000, slurm=False, apt=None, env={"MASKCONNECT_REQUIRE_SLURM": "0"})
    assert r.returncode == 0 and ran == "REQUIRE=0 NS=1" and "test_slurm.py may skip" in r.stderr
    r, ran, log = ci(0, slurm=True, apt=0, env={"MASKCONNECT_REQUIRE_NAMESPACES": "0"})
    assert r.returncode == 0 and ran == "REQUIRE=1 NS=0" and "mount-namespace tests of tests/test_faults.py may skip" in r.stderr


# --- scripts/setup.sh -------------------------------------------------------------------------------

HARMLESS = "WARNING: requirements/x is ignored: it is neither a file nor a directory"


@pytest.fixture
def setup_sh(tmp_path):
    """A scratch project with scripts/setup.sh and a stub .venv/bin/python whose `pip install` prints
    the harmless warning setup.sh filters, then an error, and exits with $FAKE_PIP_STATUS."""
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    (proj / "requirements").mkdir()
    (proj / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", proj / "scripts" / "setup.sh")
    (proj / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (proj / "requirements" / "constraints.txt").write_text("torch==2.15.0\n")
    _stub(proj / ".venv" / "bin" / "python",
          'case "$*" in\n'
          f'  *"-m pip install"*) [ -n "$FAKE_PIP_QUIET" ] || {{ echo "{HARMLESS}"; echo "ERROR: pip said no" >&2; }}; '
          'exit "${FAKE_PIP_STATUS:-0}";;\n'
          '  *) exit 0;;\nesac')

    def run(**env):
        r = subprocess.run(["bash", str(proj / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "MASKCONNECT_TORCH_INDEX_URL": "", **env})
        return r, (proj / ".venv" / ".maskconnect-installed").exists()

    return run


def test_setup_fails_when_pip_fails(setup_sh):
    r, stamped = setup_sh(FAKE_PIP_STATUS="1")
    assert r.returncode != 0 and not stamped
    assert "pip install failed" in r.stderr and "ERROR: pip said no" in r.stdout + r.stderr


@pytest.mark.parametrize("quiet", [False, True], ids=["warning", "no-output"])
def test_setup_succeeds_and_filters_the_harmless_warning(setup_sh, quiet):
    r, stamped = setup_sh(**({"FAKE_PIP_QUIET": "1"} if quiet else {}))
    assert r.returncode == 0 and stamped, r.stderr
    assert HARMLESS not in r.stdout + r.stderr
    r, _ = setup_sh(FAKE_PIP_STATUS="1")
    assert r.returncode == 0  # installed and unchanged: pip is not run again
