"""SPRI models behave as native transformers models, checked the way transformers' common model tests check Mixtral
and Llama, on every kind of SPRI model: SpriForCausalLM in stage 1 and stage 2 on Llama, Qwen3, Gemma 3
and GPT-2 bases, SpriForSeq2SeqLM on T5 and BART, SpriForSpeechSeq2Seq on Whisper, SpriForSequenceClassification on
BERT. Tiny random configs; each behaviour against the dense model or against the model itself another way."""

import json
import os

import pytest
import torch
from conftest import VOCAB, perturb_experts, progression_dataset, tiny, tiny_dense
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    GenerationConfig,
    Trainer,
    TrainingArguments,
)

from spri_hf import SpriForCausalLM, upcycle_checkpoint


CAUSAL = ["llama", "qwen3", "gemma3_text", "gpt2"]
CASES = [f"{family}-stage{stage}" for family in CAUSAL for stage in (1, 2)] + ["t5", "bart", "whisper", "bert"]
GENERATIVE = [case for case in CASES if case != "bert"]
AUTO = {"t5": AutoModelForSeq2SeqLM, "bart": AutoModelForSeq2SeqLM, "whisper": AutoModelForSpeechSeq2Seq,
        "bert": AutoModelForSequenceClassification}


def family_of(case: str) -> str:
    return case.split("-")[0]


def is_causal(case: str) -> bool:
    return family_of(case) in CAUSAL


def dense_of(case: str):
    return tiny_dense(family_of(case)) if is_causal(case) else tiny(family_of(case))


def spri_of(case: str, dense=None, attn_implementation: str | None = None):
    """The SPRI model of `case` (4 experts, top-2, every FFN of the upcycled stack), experts moved off their init."""
    dense = dense if dense is not None else dense_of(case)
    if attn_implementation:
        dense.set_attn_implementation(attn_implementation)
    spri_class = SpriForCausalLM if is_causal(case) else type(AUTO[case].from_config(
        __import__("spri_hf").SpriConfig(base_config=dense.config, num_experts=2, num_experts_per_tok=1, init="copy")))
    model = spri_class.from_dense(dense, num_experts=4, num_experts_per_tok=2, diversity=0.3)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    if not case.endswith("stage1"):
        model.set_stage(2)
    return perturb_experts(model, seed=1).eval()


def inputs_of(case: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    if family_of(case) == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=generator), "decoder_input_ids": ids[:, :5].clone()}
    if family_of(case) in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5].clone()}
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def labels_of(case: str, inputs: dict) -> torch.Tensor:
    if family_of(case) == "bert":
        return torch.tensor([0, 1])
    return inputs.get("decoder_input_ids", inputs.get("input_ids"))


def num_moe_layers(model) -> int:
    return len(model.moe_sites())


# ---- the backbone ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_base_model_is_the_dense_families_backbone(case):
    dense = dense_of(case)
    model = spri_of(case, dense)
    assert isinstance(model.base_model, type(dense.base_model))
    assert type(model.base_model).__name__ in (type(dense.base_model).__name__, f"Spri{type(dense.base_model).__name__}")
    if family_of(case) != "bert":
        assert isinstance(model.get_decoder(), type(dense.get_decoder()))
    if not is_causal(case) and family_of(case) != "bert":
        assert isinstance(model.get_encoder(), type(dense.get_encoder()))
    if is_causal(case) or family_of(case) == "bert":  # one-stack backbones return the routers' logits themselves
        inputs = {k: v for k, v in inputs_of(case).items()}
        with torch.no_grad():
            out = model.base_model(**inputs, output_router_logits=True)
            full = model(**inputs, output_router_logits=True)
        assert len(out.router_logits) == num_moe_layers(model)
        assert all(torch.equal(a, b) for a, b in zip(out.router_logits, full.router_logits))
        if family_of(case) in ("llama", "qwen3", "gemma3_text"):  # GPT-2 keeps its own output class (cross-attentions)
            assert type(out).__name__ == "MoeModelOutputWithPast"
            torch.testing.assert_close(model.get_output_embeddings()(out.last_hidden_state)[..., :VOCAB].shape[-1],
                                       full.logits.shape[-1])


# ---- save / load ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sharded", [False, True])
def test_save_and_load_round_trip_with_loading_info(case, sharded, tmp_path):
    model = spri_of(case)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "2GB")
    names = os.listdir(tmp_path)
    assert ("model.safetensors.index.json" in names) == sharded
    assert not any(name.endswith(".bin") for name in names)
    auto = AutoModelForCausalLM if is_causal(case) else AUTO[case]
    loaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model) and loaded.config.stage == model.config.stage
    assert not any(info.values()), info
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    inputs = inputs_of(case)
    with torch.no_grad():  # the same weights; CPU kernels may differ in the last bits between two model objects
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
    # from a state dict, without a folder
    again, info = type(model).from_pretrained(None, config=model.config, state_dict=expected, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


def test_saved_folders_get_the_modes_of_a_plain_save(tmp_path):
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    SpriForCausalLM.from_dense(dense, num_experts=4).save_pretrained(tmp_path / "spri")
    assert os.stat(tmp_path / "spri").st_mode & 0o777 == os.stat(tmp_path / "dense").st_mode & 0o777
    old = os.umask(0o027)
    try:
        SpriForCausalLM.from_dense(dense, num_experts=4).save_pretrained(tmp_path / "umask")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "umask").st_mode & 0o777 == 0o750


# ---- outputs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_return_dict_false_gives_the_same_values_as_a_tuple(case):
    model = spri_of(case)
    inputs = inputs_of(case)
    labels = labels_of(case, inputs)
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels, output_router_logits=True)
        as_tuple = model(**inputs, labels=labels, output_router_logits=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    assert torch.equal(as_tuple[0], as_dict.loss)  # then the fields in their declared order, the Nones left out
    for value, expected in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(expected, torch.Tensor):
            assert torch.equal(value, expected)
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(**inputs), tuple)


@pytest.mark.parametrize("case", CASES)
def test_hidden_states_attentions_and_router_logits_on_request_or_by_config(case):
    model = spri_of(case, attn_implementation="eager")
    inputs = inputs_of(case)
    with torch.no_grad():
        plain = model(**inputs)
        asked = model(**inputs, output_hidden_states=True, output_attentions=True, output_router_logits=True)
    assert plain.get("hidden_states") is None and plain.get("router_logits") is None
    hidden = asked.get("decoder_hidden_states") or asked.get("hidden_states")
    attentions = asked.get("decoder_attentions") or asked.get("attentions")
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    assert len(hidden) == layers + 1 and len(attentions) == layers
    assert len(asked.router_logits) == num_moe_layers(model)
    assert all(logits.shape[-1] == 4 for logits in asked.router_logits)
    torch.testing.assert_close(asked.logits, plain.logits)
    # the same through the config, as on the dense model (T5's stacks keep copies of the config: there, as on a
    # dense T5, config.output_hidden_states changes nothing)
    dense = dense_of(case)
    for config in (model.config, dense.config):
        config.output_hidden_states = True
    model.config.output_router_logits = True
    with torch.no_grad():
        by_config, dense_out = model(**inputs), dense(**inputs)
    hidden_key = "decoder_hidden_states" if "decoder_input_ids" in inputs else "hidden_states"
    assert (by_config.get(hidden_key) is None) == (dense_out.get(hidden_key) is None)
    assert by_config.get(hidden_key) is not None or family_of(case) == "t5"
    assert len(by_config.router_logits) == num_moe_layers(model)


@pytest.mark.parametrize("case", [case for case in GENERATIVE])
def test_use_cache_follows_the_config(case):
    """`config.use_cache = False` does on the SPRI model what it does on the dense one (no cache; T5 keeps its own)."""
    model, dense = spri_of(case), dense_of(case)
    inputs = inputs_of(case)

    def cache_of(out):
        return out.get("cache", out.get("past_key_values"))

    with torch.no_grad():
        cached = model(**inputs, use_cache=True)
        model.config.use_cache = False
        dense.config.use_cache = False
        uncached, dense_out = model(**inputs), dense(**inputs)
    assert cache_of(cached) is not None
    assert (cache_of(uncached) is None) == (cache_of(dense_out) is None)
    assert cache_of(uncached) is None or family_of(case) == "t5"
    assert model.config.base_config.use_cache is False
    torch.testing.assert_close(cached.logits, uncached.logits)


def test_config_edits_reach_the_dense_model():
    model = spri_of("llama-stage2")
    text = model.config.get_text_config()
    assert text.num_experts == 4 and text.hidden_size == 32  # MoE and dense fields side by side, as Mixtral's
    text.num_hidden_layers = 1
    assert model.config.base_config.num_hidden_layers == 1 and "num_hidden_layers" not in model.config.to_dict()
    rebuilt = SpriForCausalLM(model.config)
    assert len(rebuilt.base_model.layers) == 1
    config = spri_of("t5").config
    assert config.get_text_config(decoder=True).num_hidden_layers == 2
    config.num_decoder_layers = 1
    assert config.base_config.num_decoder_layers == 1


# ---- special tokens and generation defaults -------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_special_tokens_survive_to_dict_save_and_generation_config(case, tmp_path):
    model = spri_of(case)
    dense = model.config.base_config
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        expected = getattr(dense, name, None)
        assert model.config.to_dict().get(name) == expected
        assert getattr(type(model.config).from_dict(model.config.to_dict()), name) == expected
    if family_of(case) != "bert":
        assert GenerationConfig.from_model_config(model.config).eos_token_id == dense.eos_token_id
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("eos_token_id") == dense.eos_token_id


@pytest.mark.parametrize("stage", [1, 2])
def test_a_model_built_from_its_config_stops_at_eos(stage):
    """The dense model stops at EOS; so does the SPRI model built from its config alone (no generation config)."""
    model = spri_of(f"llama-stage{stage}")
    bare = SpriForCausalLM(model.config)
    bare.load_state_dict(model.state_dict())
    bare.eval()
    prompt = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        free = bare.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    eos = int(free[0, 5])  # make the second generated token the model's EOS
    bare.config.eos_token_id = eos
    bare.generation_config = GenerationConfig.from_model_config(bare.config)
    with torch.no_grad():
        stopped = bare.generate(prompt, max_new_tokens=6, do_sample=False)
    assert stopped.shape[1] == 6 and int(stopped[0, -1]) == eos


def test_upcycling_a_folder_without_generation_config_keeps_eos(tmp_path):
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    os.remove(tmp_path / "dense" / "generation_config.json")
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "spri", num_experts=4, init="copy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "spri")
    assert loaded.generation_config.eos_token_id == dense.config.eos_token_id == 2
    assert loaded.config.eos_token_id == 2


# ---- generate -------------------------------------------------------------------------------------------------------
def generation_inputs(case: str) -> dict:
    inputs = inputs_of(case)
    inputs.pop("decoder_input_ids", None)
    return inputs


@pytest.mark.parametrize("case", GENERATIVE)
def test_generate_greedy_sample_beam_and_dict_outputs(case):
    model = spri_of(case)
    inputs = generation_inputs(case)
    settings = dict(max_new_tokens=4, min_new_tokens=4)
    with torch.no_grad():
        greedy = model.generate(**inputs, do_sample=False, **settings)
        as_dict = model.generate(**inputs, do_sample=False, return_dict_in_generate=True, output_scores=True,
                                 **settings)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, do_sample=True, top_k=5, **settings)
        torch.manual_seed(0)
        sampled_again = model.generate(**inputs, do_sample=True, top_k=5, **settings)
        beams = model.generate(**inputs, num_beams=3, do_sample=False, **settings)
    # (Whisper's plain generate leaves out the decoder start token its dict output keeps, as a dense Whisper does)
    assert torch.equal(as_dict.sequences[:, -greedy.shape[1]:], greedy) and len(as_dict.scores) == 4
    # the greedy tokens are the argmax of the scores generate reports
    assert torch.equal(torch.stack(as_dict.scores, dim=1).argmax(-1), greedy[:, -4:])
    assert torch.equal(sampled, sampled_again)
    assert beams.shape[0] == 2 and beams.shape[1] >= greedy.shape[1] - 1
    # assisted decoding (batch 1, as transformers requires), with a SPRI assistant: greedy's tokens
    first = {name: value[:1] for name, value in inputs.items()}
    with torch.no_grad():
        assisted = model.generate(**first, do_sample=False, assistant_model=spri_of(case), **settings)
    assert torch.equal(assisted, greedy[:1])


@pytest.mark.parametrize("case", [f"{family}-stage{stage}" for family in CAUSAL for stage in (1, 2)])
def test_causal_greedy_generation_matches_the_forward(case):
    """Greedy generation with the cache gives the tokens an uncached forward's argmax gives, step by step."""
    model = spri_of(case)
    prompt = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
        sequence = prompt
        for _ in range(4):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
        from_bos = model.generate(max_new_tokens=3, do_sample=False, eos_token_id=None)  # no input ids: from BOS
    assert torch.equal(generated, sequence)
    assert from_bos.shape == (1, 4) and int(from_bos[0, 0]) == model.config.bos_token_id


@pytest.mark.parametrize("family", CAUSAL)
def test_stage2_generates_with_a_static_cache(family):
    model = spri_of(f"{family}-stage2")
    prompt = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        dynamic = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
        static = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None,
                                cache_implementation="static")
    assert torch.equal(dynamic, static)


# ---- training, embeddings, compile ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama-stage1", "llama-stage2", "gpt2-stage2"])
def test_trains_a_few_steps_with_trainer(case, tmp_path):
    model = spri_of(case).train()
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=progression_dataset(n=16))
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(logged)))
    assert all(not torch.equal(param.detach(), before[name]) for name, param in model.named_parameters()
               if name in before and (".router." in name or ".experts." in name))


@pytest.mark.parametrize("case", CASES)
def test_resize_token_embeddings(case):
    model = spri_of(case)
    new_size = VOCAB + 8
    model.resize_token_embeddings(new_size)
    assert model.config.vocab_size == new_size == model.config.base_config.vocab_size
    inputs = inputs_of(case)
    with torch.no_grad():
        out = model(**inputs)
    if family_of(case) != "bert":
        assert out.logits.shape[-1] == new_size


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_stage2_compiles_in_one_graph(family):
    model = spri_of(f"{family}-stage2")
    assert model._can_compile_fullgraph and not spri_of(f"{family}-stage1")._can_compile_fullgraph
    inputs = inputs_of(f"{family}-stage2")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)


def test_resuming_a_tied_model_logs_no_missing_keys(tmp_path):
    """The tied LM head is not stored in checkpoints (as for dense models); Trainer's resume re-ties it instead of
    warning 'There were missing keys in the checkpoint model loaded: [...lm_head.weight]'."""
    import logging

    from transformers.utils import logging as hf_logging

    model = SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4).set_stage(2).train()
    assert model.config.tie_word_embeddings and model._keys_to_ignore_on_save == ["model.lm_head.weight"]
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                use_cpu=True, save_strategy="steps", save_steps=2, logging_steps=1)
    Trainer(model=model, args=TrainingArguments(max_steps=2, **args), train_dataset=progression_dataset(n=16)).train()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers.trainer")
    logger.addHandler(handler)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        resumed = SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4).set_stage(2).train()
        trainer = Trainer(model=resumed, args=TrainingArguments(max_steps=4, **args),
                          train_dataset=progression_dataset(n=16))
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert not [record for record in records if "missing keys" in record.getMessage()]
    head, embeddings = resumed.get_output_embeddings().weight, resumed.get_input_embeddings().weight
    assert head.data_ptr() == embeddings.data_ptr()  # still tied after the resume
