"""The streaming upcycler: a dense safetensors folder in, an SPRI folder out, equal bit for bit to
`from_dense(model)` + `save_pretrained`, for every family, stack, head and initialiser."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SEQ2SEQ_FAMILIES, TINY_BERT, assert_reloaded_logits, assert_same_state, tiny, tiny_dense
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from spri_hf import SpriForCausalLM, SpriForMaskedLM, SpriModel, upcycle_checkpoint
from spri_hf.cli import main as cli_main
from spri_hf.upcycling.safetensors_io import SafetensorsReader, ShardWriter


def _same_files(streamed, saved):
    for name in ("config.json", "README.md", "modeling_spri.py", "configuration_spri.py"):
        with open(os.path.join(streamed, name)) as left, open(os.path.join(saved, name)) as right:
            assert left.read() == right.read(), name


@pytest.mark.parametrize("settings", [dict(stage=1), dict(stage=2), dict(init="copy"), dict(principal_energy=0.6)])
def test_streamed_checkpoint_equals_from_dense_for_every_causal_family(family, settings, tmp_path):
    dense = tiny_dense(family)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="40KB")  # several input shards
    settings = dict(num_experts=4, diversity=0.2, seed=5, **settings)
    out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "spri", max_shard_size="60KB", **settings)
    reference = SpriForCausalLM.from_dense(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), **settings)
    reference.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, SpriForCausalLM)
    assert_same_state(loaded, reference)
    _same_files(out, tmp_path / "saved")
    # from_dense on the folder takes the same streaming path, in memory (buffers computed: same logits)
    from_folder = SpriForCausalLM.from_dense(str(tmp_path / "dense"), **settings)
    assert_same_state(from_folder, reference)
    ids = torch.arange(10)[None] % 90
    assert_reloaded_logits(from_folder(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("source", ["folder", "module"])
def test_principal_energy_decomposes_every_matrix_once(source, tmp_path, monkeypatch):
    """The ranks `principal_energy` chooses are measured on the singular values alone, before the skeleton is built;
    the upcycling workers take them from there and run one full SVD per FFN matrix."""
    from spri_hf.upcycling import initializers

    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    settings = dict(num_experts=4, principal_energy=0.6, seed=2)
    reference = SpriForCausalLM.from_dense(dense, **settings)
    calls = []
    full_svd = initializers.thin_svd
    monkeypatch.setattr(initializers, "thin_svd", lambda weight, *a, **k: calls.append(weight.shape) or full_svd(weight, *a, **k))
    upcycled = SpriForCausalLM.from_dense(dense if source == "module" else str(tmp_path / "dense"), **settings)
    matrices = 3 * dense.config.num_hidden_layers  # gate, up and down of every layer
    assert len(calls) == matrices
    assert_same_state(upcycled, reference)
    # the ranks are the ones the full SVD's singular values give
    for layer in dense.model.layers:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            weight = getattr(layer.mlp, proj).weight
            exact = initializers.principal_rank(full_svd(weight)[1], principal_energy=0.6)
            assert initializers.principal_rank(initializers.singular_values(weight), principal_energy=0.6) == exact


@pytest.mark.parametrize("family", ["whisper", "marian", "t5", "mt5", "bert"])
@pytest.mark.parametrize("upcycle", ["decoder", "both"])
def test_streamed_checkpoint_equals_from_dense_for_seq2seq_and_encoder_heads(family, upcycle, tmp_path):
    _, _, spri_class = SEQ2SEQ_FAMILIES[family]
    if family == "bert":  # one stack: the encoder
        upcycle = None
    dense = tiny(family)
    dense.save_pretrained(tmp_path / "dense")
    settings = dict(num_experts=4, upcycle=upcycle, seed=1)
    out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "spri", spri_class=spri_class, **settings)
    reference = spri_class.from_dense(dense, **settings)
    assert_same_state(spri_class.from_pretrained(out), reference)


def _weight_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")}


@pytest.mark.parametrize(
    "family, settings",
    [
        ("llama", dict(stage=1)),
        ("qwen3", dict(stage=2, partition="random")),
        ("gpt2", dict(principal_energy=0.6, stage=2)),  # plain FFN with biases; energy-chosen ranks
        ("phi3", dict(init="noise")),
    ],
)
def test_concurrent_svds_give_bit_identical_checkpoints(family, settings, tmp_path):
    """The SVD workers change when the work is done, never what it gives: the weight files are byte for byte the same
    with 1, 2 or 3 workers (more workers than cores included), and so is the in-memory upcycle."""
    dense = tiny_dense(family)
    dense.save_pretrained(tmp_path / "dense")
    settings = dict(num_experts=4, diversity=0.3, seed=3, **settings)
    written = {}
    for workers in (1, 2, 3):
        out = upcycle_checkpoint(tmp_path / "dense", tmp_path / f"spri-{workers}", svd_workers=workers, **settings)
        written[workers] = _weight_bytes(out)
    assert written[1] and written[2] == written[1] and written[3] == written[1]
    sequential = SpriForCausalLM.from_dense(dense, svd_workers=1, **settings)
    assert_same_state(SpriForCausalLM.from_dense(dense, svd_workers=2, **settings), sequential)
    assert_same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "spri-2"), sequential)
    with pytest.raises(ValueError, match="svd_workers=0"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "never", svd_workers=0, **settings)
    assert not (tmp_path / "never").exists()


def test_an_svd_device_that_is_not_there_is_refused_naming_it(tmp_path):
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    unavailable = "cuda" if not torch.cuda.is_available() else "cuda:99"
    with pytest.raises(ValueError, match=f"svd_device='{unavailable}' is not available on this machine"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "spri", num_experts=4, svd_device=unavailable)
    with pytest.raises(ValueError, match="svd_device='meta' is not available"):
        SpriForCausalLM.from_dense(dense, num_experts=4, svd_device="meta")
    assert not (tmp_path / "spri").exists()


def test_streamed_masked_lm_ties_and_bare_backbone(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    torch.manual_seed(0)
    dense = AutoModelForMaskedLM.from_config(AutoConfig.for_model("xlm-roberta", **TINY_BERT, pad_token_id=1)).eval()
    dense.save_pretrained(tmp_path / "mlm")
    out = upcycle_checkpoint(tmp_path / "mlm", tmp_path / "spri", spri_class=SpriForMaskedLM, num_experts=4)
    assert_same_state(SpriForMaskedLM.from_pretrained(out), SpriForMaskedLM.from_dense(dense, num_experts=4))
    # a bare backbone (with its pooler), upcycled as SpriModel
    torch.manual_seed(1)
    backbone = AutoModel.from_config(AutoConfig.for_model("xlm-roberta", **TINY_BERT, pad_token_id=1)).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    out = upcycle_checkpoint(tmp_path / "backbone", tmp_path / "spri-backbone", spri_class=SpriModel, num_experts=4)
    assert_same_state(SpriModel.from_pretrained(out), SpriModel.from_dense(backbone, num_experts=4))


def test_dtype_conversion_and_tokenizer_files_carried(tmp_path):
    dense = tiny_dense("qwen2")
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "spri", dtype="bfloat16", num_experts=4, stage=2)
    loaded = SpriForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16 and json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    # float64 -> bfloat16 directly vs through float32: equal up to one bfloat16 rounding
    reference = SpriForCausalLM.from_dense(dense, num_experts=4, stage=2).state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference[key].to(torch.bfloat16), rtol=2**-7, atol=1e-6)


def test_a_checkpoint_that_cannot_be_streamed_is_loaded_whole_with_the_same_result(tmp_path, monkeypatch):
    """A folder whose tensors would be converted on load (`NotStreamable`) is loaded with from_pretrained and read as
    a model in memory by both entry points: the same tensors, bit for bit, as from_dense on the loaded model."""
    from spri_hf.upcycling import sources

    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    settings = dict(num_experts=4, diversity=0.2, seed=5)
    reference = SpriForCausalLM.from_dense(dense, **settings)

    def converted(*args, **kwargs):
        raise sources.NotStreamable("checkpoint tensor 'x' is converted on load (forced by the test)")

    monkeypatch.setattr(sources, "checkpoint_names", converted)
    out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "spri", **settings)
    assert_same_state(AutoModelForCausalLM.from_pretrained(out), reference)
    assert_same_state(SpriForCausalLM.from_dense(str(tmp_path / "dense"), **settings), reference)


@pytest.mark.parametrize("source", ["checkpoint", "folder", "module"])
def test_the_config_is_made_once_per_run(source, tmp_path, monkeypatch):
    """The entry point makes the run's SpriConfig once, from the config the dense weights come with; the pipeline,
    the sources and the sinks receive it made."""
    from spri_hf.upcycling import settings as upcycling_settings

    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    made = []
    make_config = upcycling_settings.make_config
    monkeypatch.setattr(upcycling_settings, "make_config", lambda *a, **k: made.append(1) or make_config(*a, **k))
    if source == "checkpoint":
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "spri", num_experts=4)
    else:
        SpriForCausalLM.from_dense(str(tmp_path / "dense") if source == "folder" else dense, num_experts=4)
    assert len(made) == 1


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="svd_method='qr'"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", svd_method="qr")
    with pytest.raises(ValueError, match="dtype='int8'"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["dense"]
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "existing", num_experts=4)
    assert (tmp_path / "existing" / "keep.txt").read_text() == "precious"


def test_checkpoint_that_does_not_match_its_config_names_the_tensor(tmp_path):
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    config = json.load(open(tmp_path / "dense" / "config.json"))
    config["intermediate_size"] = 64
    json.dump(config, open(tmp_path / "dense" / "config.json", "w"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=4)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder left behind


def test_truncated_and_pickle_only_checkpoints_are_refused(tmp_path):
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    weights = tmp_path / "dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(OSError, match="truncated"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=4)
    weights.unlink()
    torch.save(dense.state_dict(), tmp_path / "dense" / "pytorch_model.bin")
    with pytest.raises(OSError, match="only pickle files"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=4)
    assert not (tmp_path / "out").exists()


def test_a_config_without_dtype_streams_in_the_weights_dtype(tmp_path):
    # the dtype then comes from the safetensors headers (the most common floating dtype)
    tiny_dense("llama").to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=4)
    assert SafetensorsReader(str(out)).entries["model.model.embed_tokens.weight"].dtype == torch.bfloat16


def test_shard_writer_files_read_back_with_safetensors(tmp_path):
    tensors = {f"t{i}": torch.randn(3, i + 1, dtype=dtype) for i, dtype in enumerate([torch.float32, torch.bfloat16] * 3)}
    tensors["scalar"] = torch.tensor(2.5)
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardWriter(str(tmp_path), plan, max_shard_bytes=40)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as handle:
            assert torch.equal(handle.get_tensor(name), tensors[name])
    reader = SafetensorsReader(str(tmp_path))
    assert all(torch.equal(reader.get(name), tensor) for name, tensor in tensors.items())


def test_cli_streams_a_safetensors_folder(tmp_path, capsys, input_ids):
    dense = tiny_dense("mistral")
    dense.save_pretrained(tmp_path / "dense")
    code = cli_main(
        ["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--svd-method", "full",
         "--dtype", "bfloat16", "--max-shard-size", "50KB"]
    )
    assert code == 0 and "(streamed)" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert loaded.dtype == torch.bfloat16 and os.path.isfile(tmp_path / "moe" / "model.safetensors.index.json")
    direct = SpriForCausalLM.from_dense(str(tmp_path / "dense"), num_experts=4, dtype=torch.bfloat16, svd_method="full")
    assert_same_state(loaded, direct)
    assert_reloaded_logits(loaded(input_ids).logits, direct(input_ids).logits)
    dense_logits = dense(input_ids).logits
    assert (loaded(input_ids).logits.float() - dense_logits).abs().max() < 0.05 * dense_logits.abs().max()


@pytest.mark.slow
def test_peak_memory_stays_near_one_layer(tmp_path):
    """A fresh process upcycles a 12-layer checkpoint (~190 MB fp32) into 8 stage-2 experts (~1.1 GB written): its
    peak RSS grows by less than a third of what it writes. Loading the dense model alone would add 190 MB; holding
    the MoE model, 1.1 GB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    script = f"""
import resource, spri_hf
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spri_hf.upcycle_checkpoint({str(tmp_path / 'dense')!r}, {str(tmp_path / 'spri')!r}, num_experts=8, stage=2,
                           max_shard_size="200MB")
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    before_kb, after_kb = map(int, result.stdout.split()[-2:])
    written = sum(f.stat().st_size for f in (tmp_path / "spri").glob("*.safetensors"))
    assert written > 1_000_000_000 and len(list((tmp_path / "spri").glob("*.safetensors"))) >= 5
    assert (after_kb - before_kb) * 1024 < written / 3, (before_kb, after_kb, written)
