"""SPRI checkpoints load as remote code in the oldest and the newest transformers 5.x they support.

A checkpoint carries its modeling code (`save_pretrained` copies it, with an `auto_map`), so it is read by whatever
transformers an engine pins: vLLM 0.32 pins >=5.16.1,<5.20, SGLang another. Here checkpoints of both stages, saved
from this environment, are loaded with `AutoModel*.from_pretrained(folder, trust_remote_code=True)` in virtual
environments that hold torch and one transformers and no spri_hf (tests/engines.py builds and caches them), and
must give the logits they gave when saved. One process per transformers version loads every checkpoint.
"""

import json
import sys

import pytest
import torch
from conftest import perturb_experts, tiny, tiny_dense
from engines import TORCH_CPU, engine_env, installed_version, run_in

from spri_hf import SpriForCausalLM, SpriForSeq2SeqLM, SpriForSpeechSeq2Seq


pytestmark = pytest.mark.engines

# The oldest 5.16.x and the newest 5.x on PyPI (bump NEWEST as transformers releases; the range is the remote code's).
TRANSFORMERS = {"oldest": "5.16.0", "newest": "5.24.0"}
ATOL = 1e-5  # float32 logits of the same weights and inputs in two transformers versions

IDS = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
DECODER_IDS = torch.tensor([[1, 5, 6], [1, 7, 8]])
FEATURES = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))  # (batch, mel bins, frames)


def _causal(family):
    return SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4), dict(input_ids=IDS), "AutoModelForCausalLM"


def _seq2seq(family):
    model = SpriForSeq2SeqLM.from_dense(tiny(family), num_experts=4)
    return model, dict(input_ids=IDS, decoder_input_ids=DECODER_IDS), "AutoModelForSeq2SeqLM"


def _speech():
    model = SpriForSpeechSeq2Seq.from_dense(tiny("whisper"), num_experts=4, upcycle="both")
    return model, dict(input_features=FEATURES, decoder_input_ids=DECODER_IDS), "AutoModelForSpeechSeq2Seq"


# name -> builder of (model, inputs, auto class); every model is saved at stage 1 and, after set_stage(2), stage 2
MODELS = {
    "llama": lambda: _causal("llama"),
    "qwen3": lambda: _causal("qwen3"),
    "gpt2": lambda: _causal("gpt2"),
    "olmo3": lambda: _causal("olmo3"),  # no table entry: the detected layout travels in the config
    "falcon": lambda: _causal("falcon"),
    "opt": lambda: _causal("opt"),  # an FFN the block calls itself
    "t5": lambda: _seq2seq("t5"),
    "whisper": _speech,
}
CASES = [f"{name}-stage{stage}" for name in MODELS for stage in (1, 2)]

# Run in the engine's environment: load each checkpoint as remote code, record its logits (or the error), and for
# the causal LMs the greedy continuation (generation goes through the cache, whose name changed in 5.24).
LOADER = """
import importlib.util, json, sys, traceback
import torch, transformers

assert importlib.util.find_spec("spri_hf") is None, "spri_hf is importable: the remote code would not be tested"
torch.set_num_threads(1)
folder = sys.argv[1]
cases = json.load(open(f"{folder}/cases.json"))
results = {}
for name, auto in cases.items():
    try:
        inputs = torch.load(f"{folder}/{name}.inputs.pt")
        model = getattr(transformers, auto).from_pretrained(f"{folder}/{name}", trust_remote_code=True).eval()
        with torch.no_grad():
            result = {"module": type(model).__module__, "logits": model(**inputs).logits}
            if auto == "AutoModelForCausalLM":
                result["generated"] = model.generate(inputs["input_ids"], max_new_tokens=5, min_new_tokens=5,
                                                     do_sample=False)
    except Exception:
        result = {"error": traceback.format_exc()}
    results[name] = result
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every case saved in one folder, with its inputs and this environment's logits (and greedy continuation)."""
    folder = tmp_path_factory.mktemp("remote-code")
    references, cases = {}, {}
    for name, build in MODELS.items():
        model, inputs, auto = build()
        perturb_experts(model)  # experts and routers that differ from their initialisation, as after training
        for stage in (1, 2):
            case = f"{name}-stage{stage}"
            model.set_stage(stage).eval()
            model.save_pretrained(folder / case)
            torch.save(inputs, folder / f"{case}.inputs.pt")
            with torch.no_grad():
                references[case] = {"logits": model(**inputs).logits}
                if auto == "AutoModelForCausalLM":
                    references[case]["generated"] = model.generate(
                        inputs["input_ids"], max_new_tokens=5, min_new_tokens=5, do_sample=False
                    )
            cases[case] = auto
    (folder / "cases.json").write_text(json.dumps(cases))
    (folder / "loader.py").write_text(LOADER)
    return folder, references


@pytest.fixture(scope="module", params=list(TRANSFORMERS))
def loaded(request, checkpoints):
    """`(engine, results)`: what the loader recorded in the environment of one transformers version."""
    folder, _ = checkpoints
    pin = TRANSFORMERS[request.param]
    venv = engine_env("transformers", [TORCH_CPU, [f"transformers=={pin}", "safetensors"]])
    engine = f"transformers {installed_version(venv, 'transformers')}"
    out = folder / f"results-{pin}.pt"
    # the remote code is copied into HF_MODULES_CACHE: one per version, inside the test's folder
    run_in(venv, engine, [str(folder / "loader.py"), str(folder), str(out)], cwd=folder,
           env={"HF_MODULES_CACHE": str(folder / f"modules-{pin}"), "OMP_NUM_THREADS": "1"})  # fmt: skip
    return engine, torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_loads_as_remote_code_with_the_same_logits(loaded, checkpoints, case):
    engine, results = loaded
    reference = checkpoints[1][case]
    result = results[case]
    assert "error" not in result, f"{engine}: {case} failed as remote code (load, forward or generate):\n{result.get('error')}"
    assert result["module"].startswith("transformers_modules."), (
        f"{engine}: {case} was built by {result['module']}, not by the checkpoint's remote code"
    )
    diff = (result["logits"] - reference["logits"]).abs().max().item()
    print(f"{engine} {case}: max |logit diff| = {diff:.2e}", file=sys.stderr)
    assert diff <= ATOL, f"{engine}: {case} logits differ from the saving environment's by {diff:.2e} (> {ATOL})"
    if "generated" in reference:
        assert torch.equal(result["generated"], reference["generated"]), (
            f"{engine}: {case} greedy generation differs: {result['generated'].tolist()} vs "
            f"{reference['generated'].tolist()}"
        )
