"""CPU threads and loader workers from the cores this process may use (affinity, cgroup quota, other work)."""
from hlbench.engine.cores import busy_cores, cgroup_cpu_quota, loader_workers

# /proc/stat readings: cpu<N> user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0 0 0\ncpu1 50 0 50 900 0 0 0 0 0 0\nintr 5\n"
AFTER = "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 130 0 0 960 10 0 0 0 0 0\ncpu1 120 0 80 900 0 0 0 0 0 0\nintr 9\n"


def test_busy_cores_sums_each_cores_busy_fraction_over_the_allowed_ones():
    # cpu0: 30 busy of 100 ticks (idle 60 + iowait 10 are not busy); cpu1: 100 busy of 100
    assert abs(busy_cores(BEFORE, AFTER, {0, 1}) - 1.3) < 1e-9
    assert abs(busy_cores(BEFORE, AFTER, {0}) - 0.3) < 1e-9
    assert busy_cores(BEFORE, AFTER, {5}) == 0.0  # a core the readings do not list


def test_cgroup_cpu_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None


def test_loader_workers_fit_all_streams_in_the_free_cores():
    assert loader_workers(8, streams=1, free=2) == 2  # the recipe's 8 on a 2-core machine
    assert loader_workers(2, streams=2, free=2) == 1  # semi-supervised: labelled + unlabelled streams
    assert loader_workers(2, streams=1, free=16) == 2  # never more than asked
    assert loader_workers(0, streams=1, free=4) == 0  # loading in the training process stays so
    assert loader_workers(4, streams=3, free=2) == 1  # at least one each
