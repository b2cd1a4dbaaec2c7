"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd as child processes.

Everything lives in a temp dir (config, munge key and socket, state, spool, logs, fake GPU device
nodes); nothing under /etc is read or written, so it runs beside any other SLURM or munge. No
cgroups and no accounting database: ``proctrack/linuxproc``, ``task/none``,
``accounting_storage/none`` (so ``sacct`` does not work; query ``squeue``/``scontrol``, which keep
finished jobs for ``MinJobAge``). One node (named ``hostname -s``) in two partitions: ``cpu`` (the
default) and ``gpu``, whose node has ``Gres=gpu:2`` backed by character devices made with mknod
(enough for SLURM to allocate them and set ``CUDA_VISIBLE_DEVICES``; no GPU is needed).

Needs root (slurmd runs jobs as their user; mknod) and Debian's packages
``slurmctld slurmd slurm-client munge`` (.ci/run installs them); :func:`skip_reason` says why
the cluster cannot start here. The daemons are stopped by process id.

    cluster = SlurmCluster(tmp_dir); cluster.start(); env = cluster.env(); ...; cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = "slurmctld slurmd slurm-client munge"
CPU_PARTITION = "cpu"
GPU_PARTITION = "gpu"
FAKE_GPUS = 2


def skip_reason() -> str | None:
    """Why a cluster cannot start on this machine, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a real SLURM cluster needs root (slurmd, munged as user munge, mknod for fake GPUs)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}): "
                f"apt-get install -y --no-install-recommends {PACKAGES} (.ci/run does)")
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (install the munge package)"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 8000


class SlurmCluster:
    def __init__(self, root: Path, *, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        # more CPUs than the machine has (config_overrides), so short jobs do not queue behind a
        # sleeping one; the jobs of the tests are light
        self.cpus = cpus or max(4, os.cpu_count() or 1)
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- setup ----------------------------------------------------------------------------------

    def _write_files(self) -> None:
        import pwd

        munge = pwd.getpwnam("munge")
        r = self.root
        for d in ("etc", "state", "spool", "log", "dev", "munge", "bin"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # The SLURM executor's job step (snakemake-executor-plugin-slurm-jobstep) runs the rule under
        # a nested srun with every SLURM_* variable removed, SLURM_CONF included; a real cluster has
        # its config at the default path, this one has not: an srun first on PATH puts it back.
        srun = r / "bin" / "srun"
        srun.write_text(f'#!/bin/sh\nexport SLURM_CONF="{self.conf}"\nexec {shutil.which("srun")} "$@"\n')
        srun.chmod(0o755)
        os.chmod(r, 0o755)
        mdir = r / "munge"
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.chmod(mdir, 0o700)
        key = mdir / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        for i in range(FAKE_GPUS):  # character devices like the NVIDIA driver's (major 195)
            dev = r / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(195, i))
        ctld_port, slurmd_port = _free_ports(2)
        self.munge_socket = mdir / "munge.socket"
        (r / "etc" / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={r}/dev/nvidia[0-{FAKE_GPUS - 1}]\n")
        self.conf.write_text(f"""\
ClusterName=maskconnect-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=2
InactiveLimit=0
Waittime=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_mem_mb()} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName={CPU_PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName={GPU_PARTITION} Nodes={self.host} MaxTime=INFINITE State=UP
""")

    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: os.environ) with SLURM_CONF pointing at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[k]  # not inside some other job
        return env

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True, **kw)
        log.close()

    def _wait(self, what: str, ok, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode} while waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.1)

    def start(self) -> "SlurmCluster":
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munge.seed"],
                    user="munge", group="munge")
        self._wait("munged", self.munge_socket.exists)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self._run(["scontrol", "ping"]).stdout.count("UP") >= 1)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait("an idle node", lambda: self._run(["sinfo", "-h", "-o", "%T"]).stdout.split()[:1] == ["idle"])
        return self

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (SIGTERM, then SIGKILL), each by its process id."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            ids = self._run(["squeue", "-h", "-o", "%i"]).stdout.split()
            if ids:
                self._run(["scancel", *ids])
                deadline = time.monotonic() + 10
                busy = ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"]
                while time.monotonic() < deadline and self._run(busy).stdout.split():
                    time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ---- queries --------------------------------------------------------------------------------

    def logs(self, tail: int = 40) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            out.append(f"---- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def jobs(self) -> list[dict]:
        """Every job slurmctld still knows (finished ones for MinJobAge), as `scontrol show job -o` fields."""
        text = self._run(["scontrol", "show", "job", "-d", "-o"]).stdout
        jobs = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            fields, key = {}, None
            for tok in line.split(" "):
                if "=" in tok and not tok.startswith("="):
                    key, _, val = tok.partition("=")
                    fields[key] = val
                elif key:  # a value with spaces (Comment=..., Command=...)
                    fields[key] += " " + tok
            jobs.append(fields)
        return jobs
