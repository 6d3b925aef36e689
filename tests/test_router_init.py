"""Routers initialised from data: `spri_hf.init_routers` and `spri-hf upcycle --router_init`. Real tiny models, a real
word-level tokenizer, real forward passes; each layer's hidden states come from the model initialised so far."""

import json
import math
import re

import pytest
import torch
from conftest import tiny_dense
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spri_hf import SpriForCausalLM, init_routers
from spri_hf.cli import main as cli_main


ANIMALS = ["the cat sat on the mat", "a dog ran in the park", "my bird sings at dawn", "the fish swims in blue water"]
NUMBERS = ["one two three four", "five six seven eight", "nine ten eleven twelve", "zero and one hundred"]
TEXTS = [f"{a} while {b}" for a in ANIMALS for b in NUMBERS] * 2


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def block_inputs(model, tokenizer, texts, layer: int) -> torch.Tensor:
    """The hidden states entering MoE block `layer` (non-padding tokens), computed independently of spri_hf."""
    block, seen = model.moe_blocks()[layer], []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for text in texts:
                model(**tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    return torch.cat([states.reshape(-1, states.shape[-1]) for states in seen]).float()


def routers(model) -> list[torch.Tensor]:
    return [block.router.weight.detach().clone() for block in model.moe_blocks().values()]


def test_kmeans_routing_starts_between_uniform_and_one_hot_and_spreads_the_tokens():
    tokenizer = word_tokenizer()
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="spri")
    reports = init_routers(model, tokenizer, TEXTS, method="kmeans", show_progress=False)
    assert [report["site"] for report in reports] == ["decoder.0", "decoder.1"]
    for layer, report in enumerate(reports):
        assert report["entropy"] == pytest.approx(0.5, abs=1e-3)
        weight = model.moe_blocks()[layer].router.weight.detach()
        assert torch.allclose(weight.norm(dim=1), torch.full((4,), report["scale"]), rtol=1e-4)
        states = block_inputs(model, tokenizer, TEXTS, layer)
        probs = torch.softmax(states @ weight.T, dim=-1)
        entropy = (torch.special.entr(probs).sum(-1).mean() / math.log(4)).item()
        assert entropy == pytest.approx(0.5, abs=0.02)  # what the report says, on an independent forward
        assert len(set(probs.argmax(-1).tolist())) >= 3  # several experts are some tokens' first choice
    again = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="spri")
    init_routers(again, tokenizer, TEXTS, method="kmeans", show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(routers(model), routers(again)))  # seeded


def test_prompts_rows_are_each_experts_mean_hidden_state_taken_from_the_model_initialised_so_far():
    tokenizer = word_tokenizer()
    prompts = {0: ANIMALS[:2], 1: ANIMALS[2:], 2: NUMBERS[:2], 3: NUMBERS[2:]}
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="noise", noise_std=0.5)
    original = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="noise", noise_std=0.5)
    init_routers(model, tokenizer, prompts, method="prompts", show_progress=False)
    for layer in (0, 1):
        rows = torch.nn.functional.normalize(model.moe_blocks()[layer].router.weight.detach(), dim=-1)
        means = torch.stack([block_inputs(model, tokenizer, prompts[e], layer).mean(0) for e in range(4)])
        assert torch.allclose(rows, torch.nn.functional.normalize(means, dim=-1), atol=1e-5)
    # layer 1's inputs depend on layer 0's router: taken from the untouched model they would differ
    stale = torch.stack([block_inputs(original, tokenizer, prompts[e], 1).mean(0) for e in range(4)])
    rows = torch.nn.functional.normalize(model.moe_blocks()[1].router.weight.detach(), dim=-1)
    assert not torch.allclose(rows, torch.nn.functional.normalize(stale, dim=-1), atol=1e-3)


def test_orthogonal_without_data_has_orthogonal_rows_at_the_random_inits_norm():
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy")
    init_routers(model, method="orthogonal", show_progress=False)
    for weight in routers(model):
        gram = weight @ weight.T
        norm = model.config.initializer_range * math.sqrt(weight.shape[1])
        assert torch.allclose(gram, norm**2 * torch.eye(4), atol=1e-5)


@pytest.mark.parametrize(
    ("method", "texts", "message"),
    [
        ("kmeans", [], "non-empty list"),
        ("kmeans", TEXTS[:3], "3 calibration texts for 4 experts"),
        ("kmeans", TEXTS[:5] + [""], "texts[5] is ''"),
        ("prompts", {0: ["a"], 1: ["b"], 2: ["c"], 7: ["d"]}, "experts [7]"),
        ("prompts", {0: ["a"], 1: ["b"]}, "experts [2, 3] have none"),
        ("centroids", TEXTS, "'centroids' is not one of"),
    ],
)
def test_bad_input_is_refused_before_any_router_changes(method, texts, message):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy")
    before = routers(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        init_routers(model, word_tokenizer(), texts, method=method, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, routers(model)))


def test_cli_upcycles_with_kmeans_routers_and_refuses_a_missing_calibration_file(tmp_path, capsys):
    dense = tmp_path / "dense"
    tiny_dense("llama").save_pretrained(dense)
    word_tokenizer().save_pretrained(dense)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    refused = ["upcycle", str(dense), str(tmp_path / "refused"), "--num_experts", "4", "--router_init", "kmeans"]
    assert cli_main(refused) == 2
    assert "--router_init kmeans needs --calibration_data FILE" in capsys.readouterr().err
    assert cli_main([*refused, "--calibration_data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt' is not a file" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    common = ["--num_experts", "4", "--init", "copy"]
    assert cli_main(["upcycle", str(dense), str(tmp_path / "plain"), *common]) == 0
    assert cli_main(["upcycle", str(dense), str(tmp_path / "kmeans"), *common, "--router_init", "kmeans",
                     "--calibration_data", str(calibration)]) == 0  # fmt: skip
    assert "initialised by kmeans, mean routing entropy 0.50" in capsys.readouterr().out
    plain = SpriForCausalLM.from_pretrained(tmp_path / "plain")
    kmeans = SpriForCausalLM.from_pretrained(tmp_path / "kmeans")
    expected = SpriForCausalLM.from_pretrained(tmp_path / "plain")
    init_routers(expected, word_tokenizer(), TEXTS, method="kmeans", show_progress=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(routers(kmeans), routers(expected)))
    assert not all(torch.allclose(a, b) for a, b in zip(routers(kmeans), routers(plain)))
    assert (tmp_path / "kmeans" / "tokenizer.json").is_file()  # the rest of the checkpoint is kept
