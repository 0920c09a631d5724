"""core.host_memory: what this process may use of the host's memory, the machine's figure or its
cgroup's limit (v2, v1) when smaller; read from fake cgroup trees under tmp_path (no real cgroup
can be made here) and live on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sae_shards.core import host_memory
from sae_shards.core.host_memory import (V1_UNLIMITED, CgroupMemory, cgroup_memory,
                                         memory_available, memory_cgroup_dirs, memory_limit)

GIB = 2**30
MIB = 2**20
V1_NONE = 2**63 - 4096  # what cgroup v1 writes for no limit (4 KiB pages)


def _tree(root: Path, cgroup: str, mountinfo: str | None,
          levels: dict[str, dict[str, int | str]]) -> Path:
    """A fake root: ``proc/self/cgroup``, ``proc/self/mountinfo`` (None: absent) and, per
    directory under ``root`` in ``levels``, its files (``memory.stat``'s keys among them)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text(mountinfo)
    for directory, files in levels.items():
        folder = root / directory.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        stat = {k: v for k, v in files.items() if "inactive_file" in k}
        for name, value in files.items():
            if name not in stat:
                (folder / name).write_text(f"{value}\n")
        if stat:
            (folder / "memory.stat").write_text(
                "cache 0\n" + "".join(f"{k} {v}\n" for k, v in stat.items()))
    return root


V2_MOUNTINFO = ("25 1 0:22 / / rw - ext4 /dev/sda1 rw\n"
                "31 23 0:27 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n")
V1_MOUNTINFO = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
                "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
                "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
                "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")


def test_a_slurm_job_s_v2_limit_is_read_above_its_step(tmp_path):
    """cgroup v2, a SLURM job whose limit (8 GiB) sits on the job's cgroup, two levels above
    the process's (its step's, limited to "max"): the job's limit, less what it uses besides
    inactive file cache (3 GiB used, 1 GiB of it such cache)."""
    job = "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_42"
    root = _tree(tmp_path, "0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0\n",
                 V2_MOUNTINFO, {
                     job: {"memory.max": 8 * GIB, "memory.current": 3 * GIB,
                           "inactive_file": GIB},
                     f"{job}/step_0/user/task_0": {"memory.max": "max",
                                                   "memory.current": 2 * GIB},
                     "/sys/fs/cgroup": {"memory.current": 50 * GIB},  # the root sets no limit
                 })
    assert cgroup_memory(root) == CgroupMemory(limit=8 * GIB, available=6 * GIB)


def test_the_tightest_of_nested_limits_wins(tmp_path):
    """A step limited below its job: its own limit; what is left, the least any level leaves
    (here the job's, which its other steps use)."""
    job = "/sys/fs/cgroup/job_1"
    root = _tree(tmp_path, "0::/job_1/step_0\n", V2_MOUNTINFO, {
        job: {"memory.max": 8 * GIB, "memory.current": 7 * GIB},
        f"{job}/step_0": {"memory.max": 4 * GIB, "memory.current": 512 * MIB},
    })
    assert cgroup_memory(root) == CgroupMemory(limit=4 * GIB, available=GIB)


def test_a_v1_limit_and_v1_s_no_limit(tmp_path):
    """cgroup v1's memory controller (a hybrid mount, as on this machine): a 2 GiB limit on
    the process's cgroup is read with its hierarchical usage and cache; v1's "no limit" (the
    largest page multiple below 2**63), everywhere, is none."""
    mine = "/sys/fs/cgroup/memory/slurm/uid_1/job_7"
    cgroup = "4:memory:/slurm/uid_1/job_7\n1:cpu,cpuacct:/\n0::/\n"
    root = _tree(tmp_path / "limited", cgroup, V1_MOUNTINFO, {
        mine: {"memory.limit_in_bytes": 2 * GIB, "memory.usage_in_bytes": GIB,
               "total_inactive_file": 256 * MIB, "inactive_file": 0},
        "/sys/fs/cgroup/memory": {"memory.limit_in_bytes": V1_NONE,
                                  "memory.usage_in_bytes": 40 * GIB},
        "/sys/fs/cgroup/unified": {"cgroup.procs": 1},  # v2 without the memory controller
    })
    assert cgroup_memory(root) == CgroupMemory(limit=2 * GIB, available=GIB + 256 * MIB)
    root = _tree(tmp_path / "none", cgroup, V1_MOUNTINFO, {
        mine: {"memory.limit_in_bytes": V1_NONE, "memory.usage_in_bytes": GIB},
        "/sys/fs/cgroup/memory": {"memory.limit_in_bytes": V1_NONE},
    })
    assert V1_NONE >= V1_UNLIMITED and cgroup_memory(root) is None


def test_a_container_s_own_cgroup_mounted_as_the_root(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names the host's path, and the
    container's mount shows that cgroup as its root: the limit is read at the mount point."""
    mountinfo = ("500 499 0:40 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup "
                 "rw,memory\n")
    root = _tree(tmp_path, "9:memory:/docker/abc\n", mountinfo, {
        "/sys/fs/cgroup/memory": {"memory.limit_in_bytes": 4 * GIB,
                                  "memory.usage_in_bytes": GIB},
    })
    assert memory_cgroup_dirs(root) == [(root / "sys/fs/cgroup/memory", host_memory._FILES["memory"])]
    assert cgroup_memory(root) == CgroupMemory(limit=4 * GIB, available=3 * GIB)


def test_standard_mount_points_without_mountinfo(tmp_path):
    root = _tree(tmp_path, "0::/\n", None, {
        "/sys/fs/cgroup": {"memory.max": 3 * GIB, "memory.current": GIB},
    })
    assert cgroup_memory(root) == CgroupMemory(limit=3 * GIB, available=2 * GIB)


def test_no_cgroup_no_limit(tmp_path):
    """Nothing to read (not Linux, or /proc not mounted), a cgroup without the memory
    controller, unreadable values: no limit."""
    assert cgroup_memory(tmp_path) is None
    root = _tree(tmp_path / "v2", "0::/a\n", V2_MOUNTINFO, {"/sys/fs/cgroup/a": {
        "memory.max": "garbage", "memory.current": 1}})
    assert cgroup_memory(root) is None


def _physical() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


@pytest.mark.skipif(not Path("/proc/self/cgroup").is_file(), reason="Linux only")
def test_live_this_machine_s_figures():
    """On this machine: the memory cgroup is found (the project's machines: v1, the controller
    at /sys/fs/cgroup/memory, no limit) and the figures are the machine's (sysconf exactly,
    MemAvailable as it moves) unless a limit is set and lower."""
    dirs = [d for d, _ in memory_cgroup_dirs()]
    if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").is_file():
        assert Path("/sys/fs/cgroup/memory") in dirs
    assert all(d.is_dir() for d in dirs), dirs
    cgroup = cgroup_memory()
    limit = memory_limit()
    assert limit.bytes == min(_physical(), cgroup.limit if cgroup else _physical())
    assert limit.limited == (cgroup is not None and cgroup.limit < _physical())
    before = _meminfo_available()
    available = memory_available()
    after = _meminfo_available()
    if cgroup is None:  # this machine
        assert not limit.limited and limit.bytes == _physical() and limit.note() == ""
        assert not available.limited and available.machine == available.bytes
        slack = 256 * MIB  # MemAvailable moves between reads
        assert min(before, after) - slack <= available.bytes <= max(before, after) + slack
    else:
        assert available.bytes <= cgroup.available


@pytest.fixture
def limited(tmp_path, monkeypatch) -> CgroupMemory:
    """This process under a fake v2 cgroup limit of 1 GiB with 512 MiB used."""
    root = _tree(tmp_path / "root", "0::/job\n", V2_MOUNTINFO, {
        "/sys/fs/cgroup/job": {"memory.max": GIB, "memory.current": 512 * MIB}})
    monkeypatch.setattr(host_memory, "cgroup_memory", lambda: cgroup_memory(root))
    return cgroup_memory(root)


def test_the_smaller_figure_is_used_and_says_it_is_a_cgroup_s(limited):
    limit, available = memory_limit(), memory_available()
    assert limit.bytes == GIB < limit.machine == _physical() and limit.limited
    assert available.bytes == 512 * MIB and available.limited
    assert "set by this process's cgroup memory limit, e.g. a SLURM job's --mem" in limit.note()
    assert f"below the machine's physical memory of {_physical() / GIB:.3f} GiB" in limit.note()
    assert "below the machine's MemAvailable of" in available.note()


def test_a_declared_tensor_within_the_machine_but_over_the_cgroup_limit_is_refused(limited,
                                                                                  tmp_path):
    """A header declaring a 2 GiB tensor (a sparse file) fits the machine's memory but not
    this process's 1 GiB cgroup limit: refused before it is mapped, saying why the bound is
    lower than the machine's memory."""
    from helpers import sparse_safetensors

    from sae_shards.core.checkpoint_checks import CheckpointError, check_declared_sizes

    file = sparse_safetensors(tmp_path / "activations.safetensors", {"x": [2**14, 2**15]})
    with pytest.raises(CheckpointError, match=r"more than this process may hold \(1.0 GiB: set "
                                              r"by this process's cgroup memory limit.*physical "
                                              r"memory of .*a larger limit raises it\)"):
        check_declared_sizes(file)


def test_the_cpu_buffer_budget_is_the_cgroup_s(limited):
    from sae_shards.capture import memory

    assert memory.default_memory_budget("cpu", 0.5) == 256 * MIB  # half of what is left
    assert memory.cgroup_note(memory.host_available()).startswith(
        "\nHost memory available, 0.500 GiB, is set by this process's cgroup memory limit")


def test_a_job_whose_buffer_fits_the_machine_but_not_its_cgroup_is_refused(limited, tmp_path,
                                                                           capsys):
    """``sae-shards train`` under a 1 GiB cgroup limit with 512 MiB used (the machine has
    several GiB free): a 0.92 GiB buffer (3000 slots of the tiny model's 81920 entries), which
    the machine's memory would take and the cgroup's limit would kill, is refused at setup,
    and the error says the budget is the cgroup's, not the machine's."""
    from sae_shards.cli import main

    if memory_available().machine <= 4 * GIB:  # the machine's own check would refuse it too
        pytest.skip("this machine has 4 GiB free or less: nothing for the cgroup's limit to add")
    rc = main(["train", "capture.capacity=3000", "logging=disabled",
               f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "the delta buffer needs" in err and "but the budget on cpu is" in err, err[-2000:]
    assert "Host memory available, 0.500 GiB, is set by this process's cgroup memory limit" \
        in err, err[-2000:]
