"""The benchmark scripts that wait for a GPU or a cluster still run: their smoke settings on the CPU print every
row of their tables (the figures themselves are quoted from real runs in the README, never asserted)."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_gpu_benchmark_smoke_prints_every_part():
    lines = _run("ssau.bench.gpu", "--smoke")
    parts = [line.split()[0] for line in lines[1:]]
    assert parts == ["end-to-end"] + ["precision"] * 4 + ["methods"] * 2 + ["decode"] * 2 + ["syncs"], lines
    assert "no CUDA" in lines[-1] and "img/s" in lines[1]


def test_overlap_benchmark_times_every_arm_on_two_ranks():
    lines = _run("ssau.bench.overlap", "--backbone", "tiny", "--steps", "2", "--rounds", "1", "--links", "0:0,1:1")
    rows = [line.split() for line in lines if line.split()[-4:-3] in (["after"], ["buckets"], ["overlap"])]
    assert [r[-4] for r in rows] == ["after", "buckets", "overlap"] * 2, lines  # link, arm, s/step, ratio, early
    assert all(float(r[-3]) > 0 for r in rows)
    assert int(rows[2][-1]) >= 1 and int(rows[0][-1]) == 0  # buckets launched inside backward only when overlapping
