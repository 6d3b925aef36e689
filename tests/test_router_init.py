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


def test_kmeans_from_model_input_batches_sends_two_separated_clusters_to_different_experts():
    """An encoder-decoder (tiny Whisper, decoder upcycled) calibrated with its own input dicts: the decoder tokens of
    two vocabulary halves, whose embeddings are pushed far apart along two directions, all take expert 0 first
    (a router row that favours both), and after k-means the halves take disjoint sets of experts; decoder padding
    (`decoder_attention_mask`) is left out."""
    from conftest import tiny

    from spri_hf import SpriForSpeechSeq2Seq

    dense = tiny("whisper")
    with torch.no_grad():
        embeddings = dense.model.decoder.embed_tokens.weight
        first, second = torch.zeros(32), torch.zeros(32)
        first[0], second[1] = 30.0, 30.0
        embeddings[3:50] += first
        embeddings[50:97] += second
    model = SpriForSpeechSeq2Seq.from_dense(dense, num_experts=4, num_experts_per_tok=1, init="copy")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for low, high in ((3, 50), (50, 97), (3, 50), (50, 97)):
        ids = torch.randint(low, high, (4, 6), generator=generator)
        mask = torch.ones_like(ids)
        mask[:, 4:] = 0  # padding: two positions per row
        batches.append({"input_features": torch.randn(4, 8, 32, generator=generator), "decoder_input_ids": ids,
                        "decoder_attention_mask": mask})  # fmt: skip
    block = model.moe_blocks()[0]
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, :2] = 1.0  # both directions favour expert 0

    def first_choices():
        seen = []
        handle = block.router.register_forward_hook(lambda module, args, out: seen.append(out[2][:, 0]))
        try:
            with torch.no_grad():
                for batch in batches[:2]:
                    model.eval()(**batch)
        finally:
            handle.remove()
        return [set(choice.reshape(4, 6)[:, :4].flatten().tolist()) for choice in seen]

    assert first_choices() == [{0}, {0}]
    init_routers(model, method="kmeans", batches=batches, show_progress=False)
    halves = first_choices()
    assert halves[0].isdisjoint(halves[1]), halves  # 4 centroids for 2 clusters: each half gets its own experts
    with pytest.raises(ValueError, match="texts or model input batches, not both"):
        init_routers(model, word_tokenizer(), TEXTS, method="kmeans", batches=batches, show_progress=False)
