"""Hostile inputs and faults: property-based settings, kill -9 mid-write, unsafe or broken checkpoints, resource
refusals and bit-identical determinism."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
import torch
from conftest import assert_reloaded_logits, assert_same_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from spri_hf import SpriConfig, SpriForCausalLM, upcycle_checkpoint
from spri_hf.cli import main as cli_main
from spri_hf.upcycling import initializers as spri_init


ENV = dict(os.environ, HF_HUB_OFFLINE="1")
CLI = [sys.executable, "-m", "spri_hf.cli"]


def _tiny_dense(seed=0, layers=2, hidden=16, inter=24):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "llama"
    _tiny_dense().save_pretrained(folder)
    return folder


def _hashes(folder) -> dict:
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    }


def _leftovers(parent, name):
    return [entry for entry in os.listdir(parent) if entry.startswith(f".{name}.")]


# ---------------------------------------------------------------------------------------------------------------
# Property-based: valid settings upcycle and keep docs/METHOD.md's invariants; invalid ones raise and write nothing.

VALID = st.fixed_dictionaries(
    {
        "num_experts": st.integers(2, 5),
        "init": st.sampled_from(["spri", "copy", "noise", "drop", "random"]),
        "principal_ratio": st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        "spri_mode": st.sampled_from(["balanced", "partition"]),
        "diversity": st.floats(0.0, 1.0),
        "residual_scale": st.floats(0.25, 2.0),
        "partition": st.sampled_from(["interleaved", "contiguous", "random"]),
        "moe_layers": st.sampled_from([None, [0], [1], [0, 1]]),
        "seed": st.integers(0, 2**31 - 1),
        "stage_two": st.booleans(),
    }
)


def _matrices(dense, idx):
    mlp = dense.model.layers[idx].mlp
    return {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight}


def _experts(model, idx):
    experts = model.model.model.layers[idx].mlp.experts
    inter = experts.down_proj.shape[-1]
    gate, up = experts.gate_up_proj.split(inter, dim=1)
    return {"gate": gate, "up": up, "down": experts.down_proj}


def _principal(weight, ratio):
    u, s, vh = spri_init.thin_svd(weight.double(), "full")
    r = spri_init.principal_rank(s, ratio)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=VALID)
def test_valid_settings_upcycle_and_keep_the_invariants(case, dense_folder, tmp_path_factory):
    case = dict(case)
    stage_two = case.pop("stage_two")
    num_experts = case["num_experts"]
    case["num_experts_per_tok"] = min(2, num_experts)
    if case["init"] == "spri" and case["principal_ratio"] < 1.0:
        tail = 16 - spri_init.principal_rank(torch.empty(16), case["principal_ratio"])
        if tail < num_experts:  # refused by design (an expert without residual directions): tested below
            with pytest.raises(ValueError, match="residual rank"):
                upcycle_checkpoint(dense_folder, tmp_path_factory.mktemp("x") / "out", **case)
            return
    if stage_two:  # full experts straight away (every init has a stage 2)
        case["stage"] = 2
    out = tmp_path_factory.mktemp("spri") / "out"
    upcycle_checkpoint(dense_folder, out, **case)
    model = SpriForCausalLM.from_pretrained(out)
    dense = LlamaForCausalLM.from_pretrained(dense_folder)
    ids = torch.arange(12).reshape(2, 6) % 50
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    stored = SpriConfig.from_pretrained(out)
    assert stored.num_experts == num_experts and stored.seed == case["seed"] and stored.init == case["init"]
    assert stored.stage == (1 if case["init"] == "spri" and not stage_two else 2)  # stage 1 is SPRI's default
    if stored.stage == 1:  # stage 1 and the materialised stage 2 are the same function
        model.set_stage(2)
        torch.testing.assert_close(model(ids).logits, logits, atol=2e-5, rtol=1e-5)
    copies = case["init"] == "copy" or (
        case["init"] == "spri" and (case["principal_ratio"] == 1.0 or (case["spri_mode"] == "balanced" and case["diversity"] == 0))
    )
    if copies:  # every expert is W: the dense model's logits for any router
        torch.testing.assert_close(logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    if case["init"] != "spri":
        return
    for idx in model.config.upcycled_layers():
        experts, matrices = _experts(model, idx), _matrices(dense, idx)
        for proj, weight in matrices.items():
            if case["spri_mode"] == "balanced":  # the experts' mean is W
                torch.testing.assert_close(experts[proj].double().mean(0), weight.double(), atol=1e-5, rtol=1e-5)
            else:  # sum_i (W_i - P) / residual_scale == W - P
                principal = _principal(weight, case["principal_ratio"])
                total = (experts[proj].double() - principal).sum(0) / case["residual_scale"]
                torch.testing.assert_close(total, weight.double() - principal, atol=1e-5, rtol=1e-5)


INVALID = st.one_of(
    st.fixed_dictionaries({"num_experts": st.one_of(st.integers(-10**9, 0), st.integers(4097, 10**9))}),
    st.fixed_dictionaries({"num_experts": st.just(4), "num_experts_per_tok": st.integers(5, 100)}),
    st.fixed_dictionaries({"init": st.text(min_size=1, max_size=8).filter(lambda t: t not in ("spri", "copy", "noise", "drop", "random"))}),
    st.fixed_dictionaries({"principal_ratio": st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1.000001))}),
    st.fixed_dictionaries({"diversity": st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1.000001), st.just(float("nan")))}),
    st.fixed_dictionaries({"num_experts": st.sampled_from(["8", 2.5, None, [8]])}),
    st.fixed_dictionaries({"moe_layers": st.sampled_from([[5], [-1], [0, 0], [], "0,1", [0.5]])}),
    st.fixed_dictionaries({"partition": st.sampled_from(["stripes", "", 3])}),
    st.fixed_dictionaries({"stage": st.sampled_from([0, 3, -1, "1"])}),
    st.fixed_dictionaries({"noise_std": st.sampled_from([-0.1, float("inf")]), "init": st.just("noise")}),
    st.fixed_dictionaries({"residual_rank": st.integers(-100, 0)}),
    st.fixed_dictionaries({"bogus_setting": st.integers()}),
    st.fixed_dictionaries({"seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32))}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=INVALID)
def test_invalid_settings_raise_and_write_nothing(case, dense_folder, tmp_path_factory):
    parent = tmp_path_factory.mktemp("invalid")
    with pytest.raises((ValueError, TypeError)):
        upcycle_checkpoint(dense_folder, parent / "out", **case)
    assert os.listdir(parent) == []  # neither the destination nor a staging folder


def test_invalid_settings_in_the_cli_write_nothing(dense_folder, tmp_path, capsys):
    assert cli_main(["upcycle", str(dense_folder), str(tmp_path / "out"), "--num-experts", "1000000000"]) == 2
    assert "num_experts=1000000000" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# kill -9 at random moments: the destination is absent or a complete checkpoint (the previous one, or the new one
# when the kill came after the rename), never half written; the next run succeeds.


@pytest.fixture(scope="module")
def medium_folder(tmp_path_factory):
    """A dense checkpoint whose 8-expert stage-2 upcycle writes ~25 MB in several shards."""
    folder = tmp_path_factory.mktemp("medium") / "llama"
    _tiny_dense(layers=4, hidden=128, inter=512).save_pretrained(folder)
    return folder


def _staged_files(parent, name, before) -> int:
    """How many files the staging folders that appeared after `before` hold (0 when there are none)."""
    count = 0
    for entry in set(_leftovers(parent, name)) - before:
        try:
            count += len(os.listdir(os.path.join(parent, entry)))
        except FileNotFoundError:  # renamed into place between the two calls
            pass
    return count


def _wait_for(predicate, timeout=120.0):
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError("the subprocess never reached the point to kill it at")
        time.sleep(0.002)


def _staged_or_exited(tmp_path, before, files, process) -> bool:
    """Whether the run `process` has staged at least `files` of its checkpoint's files (in a staging folder not in
    `before`), or has already exited."""
    return _staged_files(tmp_path, "moe", before) >= files or process.poll() is not None


def _check_destination(dest, allowed: list[dict]):
    """'absent', 'previous' or 'new'; anything else (a half checkpoint) fails."""
    if not dest.exists():
        return "absent"
    hashes = _hashes(dest)
    assert hashes in allowed, f"the destination is neither absent nor a complete checkpoint: {sorted(hashes)}"
    return "previous" if hashes == allowed[0] else "new"


def _restore(backup, dest):
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(backup, dest)


@pytest.mark.slow
def test_kill_9_during_cli_upcycle_never_leaves_a_half_checkpoint(medium_folder, tmp_path):
    dest = tmp_path / "moe"
    command = lambda seed: CLI + ["upcycle", str(medium_folder), str(dest), "--num-experts", "8", "--stage", "2",  # noqa: E731
                                  "--seed", str(seed), "--overwrite", "--max-shard-size", "3MB"]
    assert subprocess.run(command(1), env=ENV, capture_output=True).returncode == 0
    new = _hashes(dest)
    assert subprocess.run(command(0), env=ENV, capture_output=True).returncode == 0
    previous = _hashes(dest)
    assert new != previous and len(previous) > 10  # several shards, index, config, code files, card
    shutil.copytree(dest, tmp_path / "backup")
    rng = random.Random(7)
    outcomes, attempts = [], 0
    while len(outcomes) < 6 and attempts < 12:
        # kill while this run writes: once its own staging folder (earlier kills leave theirs behind) holds a random
        # number of the checkpoint's files, so the kill lands mid-write however fast the machine is
        attempts += 1
        files_before_kill = rng.randrange(1, len(new) - 1)
        before = set(_leftovers(tmp_path, "moe"))
        process = subprocess.Popen(command(1), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(partial(_staged_or_exited, tmp_path, before, files_before_kill, process))
        mid_write = process.poll() is None and _staged_files(tmp_path, "moe", before) > 0
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcome = _check_destination(dest, [previous, new])
        if outcome != "previous":
            _restore(tmp_path / "backup", dest)
        if mid_write:
            outcomes.append(outcome)
    assert len(outcomes) == 6, f"only {len(outcomes)} of {attempts} kills landed while the checkpoint was being written"
    # the next run succeeds, over whatever the kills left beside the destination
    assert subprocess.run(command(1), env=ENV, capture_output=True).returncode == 0
    assert _hashes(dest) == new
    print("kill outcomes:", outcomes, "attempts:", attempts)


_SAVE_SCRIPT = """
import sys, time, torch
import spri_hf
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(int(sys.argv[2]))
config = LlamaConfig(vocab_size=50, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=1)
model = spri_hf.SpriForCausalLM.from_dense(LlamaForCausalLM(config), num_experts=8, stage=2, init="copy")
print("saving", flush=True)
start = time.perf_counter()
model.save_pretrained(sys.argv[1], max_shard_size="3MB")
print(time.perf_counter() - start, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_save_pretrained_keeps_the_previous_checkpoint(tmp_path):
    dest = tmp_path / "saved"
    script = [sys.executable, "-c", _SAVE_SCRIPT, str(dest)]
    timing = subprocess.run(script + ["1"], env=ENV, check=True, capture_output=True, text=True)
    duration = float(timing.stdout.split()[-1])
    (dest / "tokenizer_config.json").write_text("{}")  # a file of the user's: kept by every save
    new = _hashes(dest)
    subprocess.run(script + ["0"], env=ENV, check=True, capture_output=True)
    previous = _hashes(dest)
    assert "tokenizer_config.json" in previous and previous != new
    shutil.copytree(dest, tmp_path / "backup")
    rng = random.Random(11)
    for _ in range(6):
        process = subprocess.Popen(script + ["1"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout.readline().strip() == "saving"
        time.sleep(rng.uniform(0.0, 1.2) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if _check_destination(dest, [previous, new]) != "previous":
            _restore(tmp_path / "backup", dest)
    subprocess.run(script + ["1"], env=ENV, check=True, capture_output=True)
    assert _hashes(dest) == new


def test_save_pretrained_into_a_folder_replaces_old_shards_and_keeps_other_files(tmp_path):
    model = SpriForCausalLM.from_dense(_tiny_dense(), num_experts=4)
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    (tmp_path / "out" / "special_tokens_map.json").write_text("{}")
    model.save_pretrained(tmp_path / "out")  # one file now: the old shards must not remain
    names = set(os.listdir(tmp_path / "out"))
    assert "model.safetensors" in names and "special_tokens_map.json" in names
    assert not [name for name in names if name.startswith("model-0")] and "model.safetensors.index.json" not in names
    assert _leftovers(tmp_path, "out") == []
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(tmp_path / "out" / "config.json")


# ---------------------------------------------------------------------------------------------------------------
# Unsafe or broken checkpoints


def test_pickle_only_spri_checkpoint_is_refused_unless_opted_in(tmp_path):
    model = SpriForCausalLM.from_dense(_tiny_dense(), num_experts=4)
    model.save_pretrained(tmp_path / "spri")
    state = {f"model.{k}": v for k, v in model.model.state_dict().items()}
    os.remove(tmp_path / "spri" / "model.safetensors")
    torch.save(state, tmp_path / "spri" / "pytorch_model.bin")
    with pytest.raises(OSError, match="only pickle weights.*use_safetensors=False"):
        SpriForCausalLM.from_pretrained(tmp_path / "spri")
    trusted = SpriForCausalLM.from_pretrained(tmp_path / "spri", use_safetensors=False)
    ids = torch.arange(6)[None]
    assert_same_state(trusted, model)
    assert_reloaded_logits(trusted(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "field, value, message",
    [("num_experts", 10**9, "num_experts=1000000000"), ("residual_rank", -3, "residual_rank=-3"),
     ("init", "magic", "init='magic'"), ("num_experts_per_tok", "2", "num_experts_per_tok")],
)
def test_absurd_config_is_rejected_before_allocation(tmp_path, field, value, message):
    model = SpriForCausalLM.from_dense(_tiny_dense(), num_experts=4)
    model.save_pretrained(tmp_path / "spri")
    config = json.load(open(tmp_path / "spri" / "config.json"))
    config[field] = value
    json.dump(config, open(tmp_path / "spri" / "config.json", "w"))
    start = time.perf_counter()
    with pytest.raises((ValueError, TypeError), match=message):
        SpriForCausalLM.from_pretrained(tmp_path / "spri")
    assert time.perf_counter() - start < 10  # refused from the config, nothing of 10^9 experts was built


def test_a_target_that_cannot_fit_is_refused_before_writing(tmp_path):
    """A config far beyond this machine (hidden 65536, FFN 262144): the estimate refuses it, naming the sizes."""
    folder = tmp_path / "huge"
    _tiny_dense().save_pretrained(folder)
    config = json.load(open(folder / "config.json"))
    config.update(hidden_size=65536, intermediate_size=262144, num_attention_heads=512, num_key_value_heads=512)
    json.dump(config, open(folder / "config.json", "w"))
    with pytest.raises((MemoryError, OSError), match="needs about .* (memory|disk)"):
        upcycle_checkpoint(folder, tmp_path / "out", num_experts=8)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []
    # the flag skips the estimate; the run then stops at the first tensor that does not match the config
    with pytest.raises(ValueError, match="shape"):
        upcycle_checkpoint(folder, tmp_path / "out", num_experts=8, check_resources=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.slow
def test_same_seed_gives_bit_identical_checkpoints_across_processes(dense_folder, tmp_path):
    for name in ("a", "b"):
        command = CLI + ["upcycle", str(dense_folder), str(tmp_path / name), "--num-experts", "4", "--seed", "9",
                         "--partition", "random", "--diversity", "0.3"]
        assert subprocess.run(command, env=ENV, capture_output=True).returncode == 0
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    for init in ("noise", "drop", "random"):
        for name in ("c", "d"):
            model = SpriForCausalLM.from_dense(str(dense_folder), num_experts=4, init=init, seed=4)
            model.save_pretrained(tmp_path / f"{init}-{name}")
        assert _hashes(tmp_path / f"{init}-c") == _hashes(tmp_path / f"{init}-d")
    model = SpriForCausalLM.from_dense(str(dense_folder), num_experts=4, init="noise", seed=5)
    model.save_pretrained(tmp_path / "other-seed")
    assert _hashes(tmp_path / "other-seed")["model.safetensors"] != _hashes(tmp_path / "noise-c")["model.safetensors"]
