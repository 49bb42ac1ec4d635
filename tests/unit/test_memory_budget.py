"""The memory budget follows the cgroup memory limit (v1 and v2) unless it is set explicitly."""

from pathlib import Path

from allinone.memory_budget import MiB, memory_budget

GiB = 1024 * MiB


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _budget(tmp_path: Path, soft=None, hard=None, from_cgroup=True, total=24 * GiB):
    _write(tmp_path / "meminfo", f"MemTotal:       {total // 1024} kB\nMemFree: 1 kB\n")
    return memory_budget(
        soft, hard, from_cgroup, tmp_path / "proc", tmp_path / "cg", tmp_path / "meminfo"
    )


def test_cgroup_v2_memory_max_gives_soft_and_hard_limits(tmp_path):
    # podman/docker run --memory 1g on a cgroup v2 host, with a cgroup namespace
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "cg" / "memory.max", f"{GiB}\n")
    budget = _budget(tmp_path)
    assert budget.cgroup_limit_bytes == GiB
    assert budget.soft_bytes == int(GiB * 0.8) and budget.hard_bytes == int(GiB * 0.9)
    assert "cgroup v2 memory.max" in budget.source and "1024 MiB" in budget.source
    assert budget.as_dict()["soft_limit_mb"] == 819 and budget.as_dict()["hard_limit_mb"] == 921


def test_cgroup_v2_limit_on_a_parent_applies_and_the_tightest_wins(tmp_path):
    _write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    _write(tmp_path / "cg" / "kubepods" / "memory.max", f"{8 * GiB}\n")
    _write(tmp_path / "cg" / "kubepods" / "pod1" / "memory.max", f"{2 * GiB}\n")
    _write(tmp_path / "cg" / "kubepods" / "pod1" / "ctr" / "memory.max", "max\n")
    assert _budget(tmp_path).cgroup_limit_bytes == 2 * GiB


def test_cgroup_v1_limit_seen_from_inside_a_container(tmp_path):
    # cgroup v1 without a cgroup namespace (this project's podman hosts): /proc/self/cgroup names
    # the host's path, the container's own memory cgroup is mounted at the root
    _write(tmp_path / "proc", "4:memory:/libpod_parent/libpod-abc\n2:cpu,cpuacct:/libpod-abc\n")
    _write(tmp_path / "cg" / "memory" / "memory.limit_in_bytes", "536870912\n")
    budget = _budget(tmp_path)
    assert budget.cgroup_limit_bytes == 512 * MiB
    assert budget.soft_bytes == int(512 * MiB * 0.8)
    assert "cgroup v1 memory.limit" in budget.source


def test_cgroup_v1_unlimited_and_a_limit_above_the_machine_mean_no_budget(tmp_path):
    _write(tmp_path / "proc", "4:memory:/\n")
    _write(tmp_path / "cg" / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    budget = _budget(tmp_path)
    assert budget.soft_bytes is None and budget.hard_bytes is None
    assert budget.source == "none (no cgroup memory limit)"
    _write(tmp_path / "cg" / "memory" / "memory.limit_in_bytes", f"{64 * GiB}\n")
    budget = _budget(tmp_path, total=24 * GiB)
    assert budget.soft_bytes is None and "not below the machine's" in budget.source


def test_explicit_limits_win_over_the_cgroup(tmp_path):
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "cg" / "memory.max", f"{GiB}\n")
    budget = _budget(tmp_path, soft=300)
    assert budget.soft_bytes == 300 * MiB and budget.hard_bytes is None
    assert budget.source.startswith("settings")
    off = _budget(tmp_path, from_cgroup=False)
    assert off.soft_bytes is None and "MEMORY_FROM_CGROUP=false" in off.source


def test_no_cgroup_files_means_no_budget(tmp_path):
    budget = _budget(tmp_path)
    assert budget.soft_bytes is None and budget.cgroup_limit_bytes is None
