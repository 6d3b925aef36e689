"""Sharing on the Hub: a real HTTP server speaking the Hub protocol on 127.0.0.1 (tests/hub_server.py), the real
huggingface_hub / transformers clients, and a fresh subprocess in which `spri_hf` cannot be imported."""

import ast
import hashlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import perturb_experts, tiny_dense, without_spri_hf
from datasets import Dataset
from hub_server import LocalHub, hub_env, use_local_hub
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from spri_hf import SpriForCausalLM, SpriHubCallback, SpriTrainer, SpriTrainingArguments


SHIPPED_CODE = {
    "configuration_spri.py", "modeling_spri.py", "moe_layers.py", "backbone.py", "architectures.py", "model_card.py",
    "persistence.py", "parallel.py", "defaults.py", "utils.py",
}
# transformers itself depends on safetensors and huggingface_hub, so wherever it loads remote code they are installed
ALLOWED_IMPORTS = {"torch", "transformers", "safetensors", "huggingface_hub"} | set(sys.stdlib_module_names)


@pytest.fixture
def hub(tmp_path):
    with LocalHub() as server:
        yield server


def state_digest(model) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes (its source also runs in the fresh processes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _assert_same_model(loaded, model, input_ids):
    """Bit-identical weights; logits equal up to BLAS rounding (a fresh process's tensors sit at other memory
    alignments, which can change the last bit of a float32 product: seen up to 9e-8 on tiny configs)."""
    logits, digest = loaded
    assert digest == state_digest(model)
    torch.testing.assert_close(logits, model(input_ids).logits, atol=1e-6, rtol=1e-5)
    return logits


def _load_in_fresh_process(hub, tmp_path, repo_id, input_ids, *, block_spri_hf: bool, tag: str):
    """`AutoModelForCausalLM.from_pretrained(repo_id, ...)` in a new interpreter; returns its logits and a sha256 of
    its state dict (names, dtypes, shapes and bytes)."""
    torch.save(input_ids, tmp_path / "ids.pt")
    out = tmp_path / f"logits-{tag}.pt"
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        + ("" if block_spri_hf else "import spri_hf\n")
        + f"model = AutoModelForCausalLM.from_pretrained({repo_id!r}"
        + (", trust_remote_code=True" if block_spri_hf else "")
        + ")\n"
        "print(type(model).__module__, type(model).__name__)\n"
        + "import hashlib\n"
        + inspect.getsource(state_digest)
        + f"torch.save((model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, state_digest(model)), {str(out)!r})\n"
    )
    if block_spri_hf:
        script = without_spri_hf(script)
    env = dict(os.environ, PYTHONPATH="", **hub_env(hub, tmp_path / f"home-{tag}"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    module = result.stdout.strip().splitlines()[-1]
    if block_spri_hf:
        assert module.startswith("transformers_modules.") and module.endswith("SpriForCausalLM"), module
    else:
        assert module == "spri_hf.modeling_spri SpriForCausalLM", module
    return torch.load(out)


def _third_party_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.slow
def test_push_to_hub_then_load_with_and_without_spri_hf_and_push_again(hub, tmp_path, input_ids):
    repo_id = "alice/spri-tiny-llama"
    model = perturb_experts(SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, diversity=0.3))
    with use_local_hub(hub, tmp_path / "cache"):
        model.push_to_hub(repo_id)

    files = hub.files(repo_id)
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} | SHIPPED_CODE <= set(files)
    config = json.loads(files["config.json"])
    assert config["auto_map"] == {
        "AutoConfig": "configuration_spri.SpriConfig",
        "AutoModelForCausalLM": "modeling_spri.SpriForCausalLM",
        "AutoModel": "modeling_spri.SpriModel",  # the backbone vLLM's Transformers backend builds
    }
    for name in SHIPPED_CODE:  # the uploaded code needs only torch and transformers (and its relative siblings)
        assert _third_party_imports(files[name].decode()) <= ALLOWED_IMPORTS, name
    card = files["README.md"].decode()
    total = sum(p.numel() for p in model.parameters())
    assert "spri_hf model card" in card and f"{total:,} total" in card and "active per token" in card
    assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in card and "| `num_experts` | `4` |" in card

    expected = model(input_ids).logits
    _assert_same_model(
        _load_in_fresh_process(hub, tmp_path, repo_id, input_ids, block_spri_hf=True, tag="remote"), model, input_ids
    )
    _assert_same_model(
        _load_in_fresh_process(hub, tmp_path, repo_id, input_ids, block_spri_hf=False, tag="local"), model, input_ids
    )

    # a second push of the same repo updates it: stage 2, moved experts
    commits_before = len(hub.commits(repo_id))
    perturb_experts(model.set_stage(2), seed=1)
    with use_local_hub(hub, tmp_path / "cache"):
        model.push_to_hub(repo_id)
    assert len(hub.commits(repo_id)) == commits_before + 1
    assert json.loads(hub.files(repo_id)["config.json"])["stage"] == 2
    updated = _assert_same_model(
        _load_in_fresh_process(hub, tmp_path, repo_id, input_ids, block_spri_hf=True, tag="remote-2"), model, input_ids
    )
    assert not torch.allclose(updated, expected)


def test_pushing_to_a_failing_hub_raises_a_clear_error_and_keeps_the_local_checkpoint(hub, tmp_path, input_ids):
    repo_id = "alice/fails"
    model = SpriForCausalLM.from_dense(tiny_dense("qwen3"), num_experts=4)
    local = tmp_path / "local"
    model.save_pretrained(local)
    digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in local.iterdir()}

    hub.fail_commits = True
    message = f"Pushing the model to the Hub repo '{repo_id}' failed.*500"
    with use_local_hub(hub, tmp_path / "cache"), pytest.raises(OSError, match=message):
        model.push_to_hub(repo_id)
    assert "model.safetensors" not in hub.files(repo_id)
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in local.iterdir()} == digests
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(local)(input_ids).logits, model(input_ids).logits)

    hub.fail_commits = False  # the next try succeeds
    with use_local_hub(hub, tmp_path / "cache"):
        model.push_to_hub(repo_id)
    assert "model.safetensors" in hub.files(repo_id)


def _dataset(n=32, length=10):
    rows = [{"input_ids": [3 + (s + 5 * j) % 90 for j in range(length)]} for s in range(n)]
    return Dataset.from_list([dict(row, labels=row["input_ids"]) for row in rows])


@pytest.mark.slow
@pytest.mark.parametrize("trainer_class", [Trainer, SpriTrainer])
def test_trainer_push_to_hub_uploads_code_weights_and_the_spri_card(hub, tmp_path, input_ids, trainer_class):
    """Trainer (one stage) and SpriTrainer (both stages, switch after step 2; the switch checkpoint is pushed too)."""
    repo_id = "alice/trained"
    model = SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4, diversity=0.3).train()
    args = (SpriTrainingArguments if trainer_class is SpriTrainer else TrainingArguments)(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        push_to_hub=True,
        hub_model_id=repo_id,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **({"stage1_steps": 2} if trainer_class is SpriTrainer else {}),
    )
    with use_local_hub(hub, tmp_path / "cache"):
        # a plain Trainer gets the checkpoint-push callback by hand; SpriTrainer adds it itself
        callbacks = [SpriHubCallback()] if trainer_class is Trainer else None
        trainer = trainer_class(model=model, args=args, train_dataset=_dataset(), callbacks=callbacks)
        trainer.train()
        # the pushes made at every save already carry the code files that config.json's auto_map names, and the card
        mid_training = hub.files(repo_id)
        assert {"model.safetensors", "config.json", "README.md"} | SHIPPED_CODE <= set(mid_training)
        assert "spri_hf model card" in mid_training["README.md"].decode()
        trainer.push_to_hub()
    files = hub.files(repo_id)
    assert {"model.safetensors", "config.json", "README.md"} | SHIPPED_CODE <= set(files)
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_spri.SpriForCausalLM"
    assert json.loads(files["config.json"])["stage"] == (2 if trainer_class is SpriTrainer else 1)
    card = files["README.md"].decode()
    assert "training_args" in card.lower() or "hyperparameters" in card.lower()  # Trainer's card
    # SPRI's trainers add the SPRI section to it; a plain Trainer's final card is its own (nothing is patched at
    # `import spri_hf`): its SPRI section came with the mid-training pushes above
    assert ("spri_hf model card" in card) == (trainer_class is SpriTrainer)
    model.eval()
    _assert_same_model(
        _load_in_fresh_process(hub, tmp_path, repo_id, input_ids, block_spri_hf=True, tag="trainer"), model, input_ids
    )


def test_model_card_carries_the_base_license_and_parameter_counts(tmp_path):
    dense_dir = tmp_path / "dense"
    tiny_dense("mistral").save_pretrained(dense_dir)
    (dense_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n\nA dense model.\n")
    model = SpriForCausalLM.from_dense(str(dense_dir), num_experts=4, num_experts_per_tok=1)
    assert model.config.base_model == str(dense_dir) and model.config.base_model_license == "apache-2.0"
    model.save_pretrained(tmp_path / "moe")
    card = (tmp_path / "moe" / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert "base_model:" not in card.split("---")[1]  # a local folder is not a Hub id
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and p.shape[0] == 4)
    assert f"{total:,} total" in card and f"{total - routed + routed // 4:,} active per token" in card
    # saving again updates the SPRI section in place and keeps the user's own text
    (tmp_path / "moe" / "README.md").write_text(card + "\nMy notes.\n")
    model.set_stage(2)
    model.save_pretrained(tmp_path / "moe")
    updated = (tmp_path / "moe" / "README.md").read_text()
    assert updated.count("spri_hf model card: start") == 1 and "My notes." in updated and "2 (full experts)" in updated


@pytest.mark.slow
def test_real_smollm2_upcycle_round_trips_through_the_hub(hub, tmp_path):
    """The real SmolLM2-135M, all 30 FFN layers upcycled (8 experts, top-2, stage 1): push, then load where spri_hf
    cannot be imported. Prints the upload and reload times (the issue's note quotes them)."""
    import time

    from spri_hf.assets import load_smollm2

    dense, tokenizer = load_smollm2()
    model = SpriForCausalLM.from_dense(dense, num_experts=8, num_experts_per_tok=2)
    input_ids = tokenizer("Translate English to German.\nEnglish: Close the window.\nGerman:", return_tensors="pt")
    input_ids = input_ids.input_ids
    repo_id = "alice/smollm2-135m-spri"
    start = time.perf_counter()
    with use_local_hub(hub, tmp_path / "cache"):
        model.push_to_hub(repo_id)
    upload = time.perf_counter() - start
    size = len(hub.files(repo_id)["model.safetensors"])
    start = time.perf_counter()
    remote, digest = _load_in_fresh_process(hub, tmp_path, repo_id, input_ids, block_spri_hf=True, tag="smollm2")
    reload = time.perf_counter() - start
    print(f"\nSmolLM2-135M SPRI upcycle: {size / 1e6:.0f} MB pushed in {upload:.1f}s; fresh-process download + load "
          f"with trust_remote_code + one forward: {reload:.1f}s")
    # bit-identical weights; BLAS may round differently on differently aligned tensors (see the reload test)
    assert digest == state_digest(model)
    torch.testing.assert_close(remote, model(input_ids).logits, atol=1e-4, rtol=0)
