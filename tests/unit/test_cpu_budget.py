"""Default threads follow the CPU the process may use: affinity mask and cgroup quota."""

from pathlib import Path

import pytest

from allinone.cpu_budget import cpu_budget


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_caps_a_large_affinity_mask(tmp_path):
    # docker run --cpus 2 on a 64-core host (cgroup v2, with a cgroup namespace)
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "cg" / "cpu.max", "200000 100000\n")
    budget = cpu_budget(tmp_path / "proc", tmp_path / "cg", affinity=64)
    assert budget.count == 2
    assert "cgroup v2" in budget.source and "64" in budget.source


def test_cgroup_v2_limit_on_a_parent_applies(tmp_path):
    _write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    _write(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "cg" / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    # 1.5 CPUs round down to 1
    assert cpu_budget(tmp_path / "proc", tmp_path / "cg", affinity=16).count == 1


def test_cgroup_v1_quota_seen_from_inside_a_container(tmp_path):
    # cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path, the
    # container's own cgroup is mounted at the root
    _write(tmp_path / "proc", "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    _write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_quota_us", "300000\n")
    _write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    budget = cpu_budget(tmp_path / "proc", tmp_path / "cg", affinity=64)
    assert budget.count == 3
    assert "cgroup v1" in budget.source


@pytest.mark.parametrize(
    ("quota", "period", "mask", "expected"),
    [("-1", "100000", 8, 8), ("50000", "100000", 8, 1), ("800000", "100000", 4, 4)],
)
def test_cgroup_v1_no_quota_a_small_quota_and_a_quota_above_the_mask(
    tmp_path, quota, period, mask, expected
):
    _write(tmp_path / "proc", "1:cpu:/\n2:cpuacct:/\n")
    _write(tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us", quota)
    _write(tmp_path / "cg" / "cpu" / "cpu.cfs_period_us", period)
    assert cpu_budget(tmp_path / "proc", tmp_path / "cg", affinity=mask).count == expected


def test_no_cgroup_files_means_the_affinity_mask(tmp_path):
    budget = cpu_budget(tmp_path / "missing", tmp_path / "cg", affinity=6)
    assert budget.count == 6 and budget.source.startswith("affinity mask")
