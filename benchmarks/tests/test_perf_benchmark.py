"""The performance benchmark (`python -m benchmarks.perf`) runs its smallest preset in the slow tier, so the script
never rots (several minutes on 2 CPU cores: every figure is measured with warm-ups and repeats).

Only that every figure is measured and sane is checked here; whether a target is met depends on the machine (a shared
CPU is noisy), so the targets are the benchmark's business, not the test's.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.tests.support import ROOT


MEASURED = ("block", "stage", "upcycle", "generate", "stream")


@pytest.mark.slow
def test_tiny_preset_measures_every_figure(tmp_path):
    # a results folder that does not exist yet is created (a long run once ended without writing its results)
    out = tmp_path / "not-yet" / "perf.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.perf",
        "all",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert sorted(path.name for path in out.parent.iterdir()) == ["perf.json"]  # no partial file left behind
    figures = report["figures"]

    assert set(figures) == {*MEASURED, "mergekit"}
    assert figures["mergekit"]["skipped"] and not figures["mergekit"]["rows"]  # tiny skips the real model
    for name in MEASURED:
        figure = figures[name]
        ratios = [row["ratio"] for row in figure["rows"] if row["ratio"] is not None]
        assert ratios, f"{name}: no ratio measured"
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in ratios), (name, ratios)
        # sanity checks: equal outputs and gradients, same loss, exact SVDs, checkpoints written, equal generations
        assert figure["sanity"], f"{name}: no sanity check ran"
        failed = {check: detail for check, detail in figure["sanity"].items() if not detail["passed"]}
        assert not failed, (name, failed)
        assert all(row["target"] is None or row["met"] in (True, False) for row in figure["rows"])

    # (a) every experts implementation is either measured (forward and forward+backward) or skipped with a reason
    block = figures["block"]
    measured = {row["setting"].split(",")[0] for row in block["rows"]}
    skipped = {skip["setting"] for skip in block["skipped"] if skip["reason"]}
    assert measured | skipped == {"eager", "batched_mm", "grouped_mm"}
    assert {row["metric"] for row in block["rows"]} == {
        "forward", "forward+backward", "forward vs FLOP floor", "forward+backward vs FLOP floor",
        "stage 1 forward vs FLOP floor", "stage 1 forward+backward vs FLOP floor",
    }
    assert {row["reference_name"] for row in block["rows"]} == {"native", "active-FLOP GEMMs"}
    # (e) batch 1 and batch 8
    assert [row["setting"].split(",")[0] for row in figures["generate"]["rows"]] == ["batch 1", "batch 8"]
    # the readable table went to stdout
    assert "target" in result.stdout and "met?" in result.stdout
