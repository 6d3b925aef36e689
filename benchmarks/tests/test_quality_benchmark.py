"""The quality benchmark (`python -m benchmarks.quality`) end to end on its tiny preset: data builder -> encoder states -> every method trained two
steps -> greedy decoding -> sacrebleu -> routing diagnostics -> summary, tables and plots.

The data comes from the real builder (`benchmarks.data.build`, tiny preset: Debian catalogs + espeak-ng speech).
Where the Debian packages can be neither downloaded nor found in the cache, a few hand-written pairs spoken with
espeak-ng stand in, so the benchmark itself is still exercised; without espeak-ng the test skips. The tests on
built data (espeak-ng speech) are in the slow tier; the statistics, presets and settings tests need no data.
"""

import json
import math
import shutil
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

# support first: it keeps the hub offline before `quality` imports transformers
from benchmarks.tests.support import require_packages


# isort: split
from benchmarks import quality, real_models
from benchmarks.data import build as builder


# (English, German, Simplified Chinese, Japanese): only used where the Debian packages are unavailable
HANDMADE = [
    ("Open the file in a new window.", "Öffnen Sie die Datei in einem neuen Fenster.", "在新窗口中打开文件。",
     "新しいウィンドウでファイルを開きます。"),
    ("Save the document before you close it.", "Speichern Sie das Dokument, bevor Sie es schließen.",
     "关闭前保存文档。", "閉じる前に文書を保存します。"),
    ("Delete the selected cells.", "Löschen Sie die ausgewählten Zellen.", "删除选定的单元格。", "選択したセルを削除します。"),
    ("Insert a new page after this one.", "Fügen Sie nach dieser eine neue Seite ein.", "在此页之后插入新页面。",
     "このページの後に新しいページを挿入します。"),
    ("Print the current slide.", "Drucken Sie die aktuelle Folie.", "打印当前幻灯片。", "現在のスライドを印刷します。"),
    ("The password is not correct.", "Das Kennwort ist nicht korrekt.", "密码不正确。", "パスワードが正しくありません。"),
]


def handmade_dataset(out: Path) -> Path:
    """The builder's output format (train/dev/test.jsonl, audio/*.wav, manifest.json) from HANDMADE."""
    (out / "audio").mkdir(parents=True)
    splits = {"train": HANDMADE[:3], "dev": HANDMADE[3:4], "test": HANDMADE[4:]}
    for split, pairs in splits.items():
        lines = []
        for en, *targets in pairs:
            source = f"s{HANDMADE.index((en, *targets)):05d}"
            pcm = (np.clip(real_models.espeak_clip(en), -1, 1) * 32767).astype("<i2")
            with wave.open(str(out / "audio" / f"{source}.wav"), "wb") as handle:
                handle.setnchannels(1)
                handle.setsampwidth(2)
                handle.setframerate(16000)
                handle.writeframes(pcm.tobytes())
            for lang, target in zip(("de", "zh-cn", "ja"), targets):
                row = {"id": f"{source}-{lang}", "source_id": source, "lang": lang, "en": en, "target": target,
                       "audio": f"audio/{source}.wav"}
                lines.append(json.dumps(row, ensure_ascii=False))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps({"handmade": True, "langs": ["de", "zh-cn", "ja"]}))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    # thousands of tiny ops: on a shared 2-core machine a second OpenMP thread only adds waiting
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build_tiny(folder: Path, name: str, settings: dict, fallback=None) -> Path:
    """The builder's tiny preset in `folder`; without the Debian packages, `fallback(folder)` or a skip."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    try:
        return builder.build(folder / name, **settings)
    except builder.MissingPackagesError as error:
        if fallback is None:
            pytest.skip(f"no libreoffice-l10n .debs ({error})")
        print(f"no libreoffice-l10n .debs ({error}); using hand-written pairs")
        return fallback(folder / "handmade")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return _build_tiny(tmp_path_factory.mktemp("quality-data"), "covost_tiny", builder.TINY, handmade_dataset)


@pytest.mark.slow
def test_tiny_preset_runs_every_method_end_to_end(tiny_data, tmp_path):
    preset = quality.PRESETS["tiny"]
    out = tmp_path / "results"
    summary = quality.run_benchmark(
        preset, tiny_data, out, cache=tmp_path / "cache", check_context=True, log=lambda message: None
    )

    langs = sorted({json.loads(line)["lang"] for line in (tiny_data / "test.jsonl").read_text().splitlines()})
    assert summary["languages"] == langs
    # the stage-1 variants at the preset's own schedule (0.5 of the steps, 10x) are spri's run, not trained twice
    assert set(quality.METHODS) == set(preset.methods)
    assert set(summary["methods"]) == set(preset.methods) - {"spri-s1len0.5", "spri-s1lr10x"}
    assert not (out / "runs" / "spri-s1len0.5-seed0.json").exists()
    for name, row in summary["methods"].items():
        assert math.isfinite(row["bleu"]["mean"]) and math.isfinite(row["chrf"]["mean"]), name
        for lang in langs:
            assert math.isfinite(row["per_lang"][lang]["bleu"]["mean"]), (name, lang)
            assert math.isfinite(row["per_lang"][lang]["chrf"]["mean"]), (name, lang)
    assert json.loads((out / "summary.json").read_text())["methods"].keys() == summary["methods"].keys()
    table = (out / "summary.md").read_text()
    assert "| spri |" in table and "Ablation: principal_ratio" in table
    # issue 37's rows in their own table, each paired with the row it varies and labelled by what it changes
    beyond = table.split("## Beyond the paper")[1].split("\n## ")[0]
    assert "| spri-g4 (vs spri) |" in beyond and ", G=4" in beyond and ", bias balancing" in beyond
    assert "| copy-kmeans (vs copy) | init=copy, kmeans routers |" in beyond

    for name in summary["methods"]:
        method = quality.METHODS[name]
        run = json.loads((out / "runs" / f"{name}-seed0.json").read_text())
        steps = run["spec"]["compute_matched"]["steps"] if method.compute_matched_from else preset.steps
        assert len(run["history"]) == (steps if method.train else 0)
        assert all(math.isfinite(step["loss"]) for step in run["history"])
        if not method.is_moe:
            assert run["routing"] is None
            continue
        routing = run["routing"]
        experts = preset.num_experts * method.settings.get("expert_granularity", 1)  # spri-g4: 4x the experts
        assert routing["languages"] == langs and routing["num_experts"] == experts
        for lang in langs:
            assert len(routing["load"][lang]) == len(routing["layers"])
            for layer_load in routing["load"][lang]:
                assert len(layer_load) == experts
                assert sum(layer_load) == pytest.approx(1.0)
        distances = (routing["pairwise_distance_before"], routing["pairwise_distance_after"])
        assert [len(d) for d in distances] == [len(routing["layers"])] * 2
        assert (out / "plots" / f"routing-{name}-seed0.png").stat().st_size > 0
    # copy upcycling starts with identical experts; random experts start far apart
    def distances_before(name):
        return json.loads((out / "runs" / f"{name}-seed0.json").read_text())["routing"]["pairwise_distance_before"]

    assert max(distances_before("copy")) == 0 and min(distances_before("random")) > 0.1
    # issue 37's rows: routers from k-means of training batches (part of the spec), the routing bias, G = 4
    runs = {name: json.loads((out / "runs" / f"{name}-seed0.json").read_text()) for name in ("spri-kmeans", "spri-bias")}
    assert runs["spri-kmeans"]["spec"]["router_init"] == "kmeans"
    assert runs["spri-bias"]["settings"]["router_balance"] == "bias"
    assert runs["spri-bias"]["settings"]["router_aux_loss_coef"] == 0.0
    two_stage = json.loads((out / "runs" / "spri-seed0.json").read_text())["history"]
    assert [step["stage"] for step in two_stage] == [1, 1, 2, 2]
    # the stage-1 length ablations move the switch, within the same number of steps
    for name, stages in (("spri-s1len0.25", [1, 2, 2, 2]), ("spri-s1len0.75", [1, 1, 1, 2])):
        history = json.loads((out / "runs" / f"{name}-seed0.json").read_text())["history"]
        assert [step["stage"] for step in history] == stages
    margins = summary["context_check"]["chrf_vs_source_by_margin_s"]
    assert set(margins) == {str(m) for m in quality.CONTEXT_CHECK_MARGINS}
    assert all(math.isfinite(value) for value in margins.values())
    for plot in ("bleu-per-language.png", "chrf-per-language.png", "paired-differences.png", "routing-summary.png",
                 "training-loss.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    # every ablation variant is paired with the default spri, and its table says so
    assert summary["paired"]["methods"]["spri-pr0.75"]["vs_spri"]["seeds"] == 1
    assert "ΔchrF++ vs spri (default)" in table


@pytest.mark.slow
def test_finished_runs_are_skipped_on_resume(tiny_data, tmp_path):
    preset = quality.PRESETS["tiny"]
    preset = quality.replace(preset, methods=("dense", "spri"))
    out = tmp_path / "results"
    messages = []
    quality.run_benchmark(preset, tiny_data, out, cache=tmp_path / "cache", log=messages.append)
    first = (out / "runs" / "spri-seed0.json").read_text()
    messages.clear()
    quality.run_benchmark(preset, tiny_data, out, cache=tmp_path / "cache", log=messages.append)
    assert sum("finished before" in message for message in messages) == 2
    assert (out / "runs" / "spri-seed0.json").read_text() == first
    # a process given a subset (`--methods dense`) trains nothing new and summarises every finished run of the preset,
    # not its own only (it used to overwrite summary.json with dense alone)
    messages.clear()
    assert quality.main(["--preset", "tiny", "--methods", "dense", "--data", str(tiny_data), "--out", str(out),
                         "--cache", str(tmp_path / "cache")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["methods"]) == ["dense", "spri"] and summary["seeds"] == [0]
    assert "| spri |" in (out / "summary.md").read_text()
    assert (out / "runs" / "spri-seed0.json").read_text() == first
    # --status lists what is finished, with the scores the run files hold
    rows = quality.harness.finished_runs(out)
    assert sorted(row["method"] for row in rows) == ["dense", "spri"]
    spri = next(row for row in rows if row["method"] == "spri")
    assert spri["chrf"] == json.loads(first)["metrics"]["chrf"] and spri["split"] == "test"
    assert "| . | spri | 0 |" in quality.harness.status_table(rows)
    # a changed budget is a different run: it is not taken from the old results
    messages.clear()
    changed = quality.replace(preset, steps=3, methods=("dense",))
    quality.run_benchmark(changed, tiny_data, tmp_path / "other", cache=tmp_path / "cache", reuse=[out],
                          log=messages.append)
    assert not any("finished before" in message for message in messages)
    # --status's interim paired table: pools only runs of the same budget, and pairs an ablation with spri
    assert "| spri | 0 | " in quality.harness.interim_paired(out)
    other = quality.harness.interim_paired(tmp_path / "other", [out])
    assert "| dense | 0 | " in other and "| spri |" not in other  # spri trained 4 steps, this dense 3
    ablation = quality.replace(preset, methods=("spri-pr0.75",))
    quality.run_benchmark(ablation, tiny_data, tmp_path / "ablations", cache=tmp_path / "cache", log=messages.append)
    interim = quality.harness.interim_paired(tmp_path / "ablations", [out])
    row = next(line for line in interim.splitlines() if line.startswith("| spri-pr0.75 |"))
    assert row.count("(1 seeds)") == 2  # against dense and against spri (the default), from the reused folder
    # --pair: a comparison the table has no column for
    interim = quality.harness.interim_paired(tmp_path / "ablations", [out], pairs=(("spri-pr0.75", "spri"),
                                                                                   ("spri-pr0.75", "random")))
    assert "(1 seeds)" in next(line for line in interim.splitlines() if line.startswith("| spri-pr0.75 vs spri |"))
    assert "| spri-pr0.75 vs random | no runs of both |" in interim


def test_unknown_language_is_refused_and_bleu_tokenisation():
    _, processor, _ = quality.tiny_whisper(["de"])
    with pytest.raises(ValueError, match="no language token"):
        quality.language_token_id(processor.tokenizer, "xx")
    assert quality.bleu_tokenizer("zh-cn") == "zh"
    assert quality.bleu_tokenizer("ja") in ("ja-mecab", "char")
    assert quality.bleu_tokenizer("de") == "13a"


def test_select_lr_without_spri_refuses_other_two_stage_methods(tmp_path, capsys):
    # spri-div0 trains with spri's stage-1 choice; a process that selects rates without spri cannot know that
    # choice and would train spri-div0 with the default stage 1 under a spec that matches no finished run
    with pytest.raises(SystemExit) as stopped:
        quality.main(["--preset", "cpu-xx-en", "--methods", "dense,spri-div0", "--select-lr", "1e-4",
                      "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "['spri-div0']" in error and "--learning-rates" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_covost_target_has_a_whisper_base_language_token(tmp_path):
    from transformers import WhisperTokenizer

    require_packages(*real_models.WHISPER_PARTS)
    tokenizer = WhisperTokenizer.from_pretrained(real_models.whisper_base_folder(tmp_path / "whisper"))
    tokens = {lang: tokenizer.convert_ids_to_tokens(quality.language_token_id(tokenizer, lang))
              for lang in builder.LANGS}
    assert tokens["zh-cn"] == "<|zh|>" and tokens["cy"] == "<|cy|>" and len(set(tokens.values())) == 15


def test_paired_bootstrap_on_numbers_with_a_known_answer():
    rng = np.random.default_rng(0)
    # a constant difference: the interval is that number exactly
    a = rng.normal(50, 10, size=(5, 200))
    constant = quality.paired_bootstrap(a + 2.0, a)
    assert constant["mean"] == pytest.approx(2.0) and constant["low"] == pytest.approx(2.0)
    assert constant["high"] == pytest.approx(2.0) and constant["significant"]
    # a real shift of +1 under noise of sd 3 over 5 x 400 cells: the interval holds 1 and excludes 0
    b = rng.normal(50, 10, size=(5, 400))
    shifted = quality.paired_bootstrap(b + 1.0 + rng.normal(0, 3, size=b.shape), b)
    assert shifted["low"] < 1.0 < shifted["high"] and shifted["low"] > 0 and shifted["significant"]
    # no shift: the interval holds 0, reported as no difference
    same = quality.paired_bootstrap(b + rng.normal(0, 3, size=b.shape), b)
    assert same["low"] < 0 < same["high"] and not same["significant"]
    # the interval narrows like 1/sqrt(cells): 4x the sentences, about half the width
    wide = quality.paired_bootstrap(b[:, :100] + rng.normal(0, 3, size=(5, 100)), b[:, :100])
    assert (wide["high"] - wide["low"]) / (same["high"] - same["low"]) == pytest.approx(2.0, rel=0.3)
    # a method without seeds (the untrained model) pairs with every seed of the other
    single = quality.paired_bootstrap(b[:1] + 0.5, b)
    assert single["seeds"] == 5 and single["mean"] == pytest.approx(0.5 + (b[0] - b).mean())
    with pytest.raises(ValueError, match="same seeds x sentences"):
        quality.paired_bootstrap(b[:, :10], b)


def test_paired_differences_pair_shared_seeds_and_ablations_with_the_default():
    rng = np.random.default_rng(1)
    spri = {seed: rng.normal(40, 10, size=50) for seed in range(5)}
    dense = {seed: spri[seed] + 2.0 for seed in range(5)}
    results = [{"method": "spri", "seed": seed, "sentence_chrf": list(row)} for seed, row in spri.items()]
    results += [{"method": "dense", "seed": seed, "sentence_chrf": list(row)} for seed, row in dense.items()]
    results += [{"method": "copy", "seed": seed, "sentence_chrf": list(dense[seed] - 0.5)} for seed in range(5)]
    # an ablation with three seeds, one point above the default on each sentence
    results += [{"method": "spri-pr0.75", "seed": seed, "sentence_chrf": list(spri[seed] + 1.0)} for seed in range(3)]
    # the untrained model: one run, no seeds
    results.append({"method": "dense-untrained", "seed": 0, "sentence_chrf": list(spri[0] - 3.0)})
    # rows beyond the paper pair with the row they vary: spri-g4 with spri, copy-kmeans with copy
    results += [{"method": "spri-g4", "seed": seed, "sentence_chrf": list(spri[seed] + 0.5)} for seed in range(3)]
    results += [{"method": "copy-kmeans", "seed": seed, "sentence_chrf": list(dense[seed] - 1.5)} for seed in (0, 1)]
    paired = quality.paired_differences(results)
    assert paired["methods"]["spri-g4"]["vs_spri"]["mean"] == pytest.approx(0.5)
    assert paired["methods"]["copy-kmeans"]["vs_copy"]["mean"] == pytest.approx(-1.0)
    assert paired["methods"]["copy-kmeans"]["vs_copy"]["seeds"] == 2 and "vs_spri" not in paired["methods"]["copy-kmeans"]
    assert paired["best_baseline"] == "copy" and paired["default"] == "spri"
    ablation = paired["methods"]["spri-pr0.75"]
    assert ablation["vs_spri"]["seeds"] == 3 and ablation["vs_spri"]["mean"] == pytest.approx(1.0)
    assert ablation["vs_spri"]["low"] == pytest.approx(1.0) and ablation["vs_spri"]["significant"]
    assert ablation["vs_dense"]["seeds"] == 3 and ablation["vs_dense"]["mean"] == pytest.approx(-1.0)
    # spri itself is the default; the main methods are not paired with it
    assert "vs_spri" not in paired["methods"]["spri"] and "vs_spri" not in paired["methods"]["dense"]
    assert paired["methods"]["spri"]["vs_dense"]["mean"] == pytest.approx(-2.0)
    assert paired["methods"]["spri"]["vs_dense"]["seeds"] == 5
    untrained = paired["methods"]["dense-untrained"]["vs_dense"]
    expected = np.mean([spri[0] - 3.0 - dense[seed] for seed in range(5)])
    assert untrained["seeds"] == 5 and untrained["mean"] == pytest.approx(expected)
    # extra pairs (`--pair`): any two methods over their shared seeds; a pair with a method without runs is left out
    extra = quality.paired_differences(results, pairs=(("spri-pr0.75", "copy"), ("spri", "random")))["pairs"]
    assert list(extra) == ["spri-pr0.75 vs copy"]
    assert extra["spri-pr0.75 vs copy"]["seeds"] == 3 and extra["spri-pr0.75 vs copy"]["mean"] == pytest.approx(-0.5)


def test_summary_names_the_bleu_tokenisation_of_every_language():
    from benchmarks.quality.harness import describe_bleu_tokenize

    assert describe_bleu_tokenize({"de": "13a", "sv": "13a"}) == "`13a` for every language"
    assert describe_bleu_tokenize({"de": "13a", "ja": "ja-mecab"}) == "ja `ja-mecab`, others `13a`"
    assert describe_bleu_tokenize({"ja": "ja-mecab", "zh-cn": "zh"}) == "ja `ja-mecab`, zh-cn `zh`"


@pytest.fixture(scope="module")
def tiny_xx_en(tmp_path_factory):
    return _build_tiny(tmp_path_factory.mktemp("quality-xx-en"), "covost_tiny_xx_en", builder.TINY_XX_EN)


@pytest.mark.slow
def test_x_to_english_preset_with_test_pairs_and_paired_differences(tiny_xx_en, tmp_path):
    """X->En data (each translation spoken in its language), SpriSeq2SeqTrainer for every trained method, generate,
    the trivial baselines as methods, paired intervals, and a user's own pairs file scored by every model."""
    pairs = tmp_path / "mine.jsonl"
    pairs.write_text(
        json.dumps({"lang": "de", "en": "Open the file.", "target": "Open the file.", "source_text": "Öffnen Sie die Datei."})
        + "\n" + json.dumps({"lang": "sv", "en": "Close the window.", "target": "Close the window.",
                             "source_text": "Stäng fönstret."}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    preset = quality.replace(quality.PRESETS["tiny"], methods=("dense-untrained", "source-copy", "dense", "copy", "spri"),
                             seeds=(0, 1))  # fmt: skip
    out = tmp_path / "results"
    summary = quality.run_benchmark(preset, tiny_xx_en, out, cache=tmp_path / "cache", log=lambda message: None,
                                    test_pairs=pairs, keep_models=True)  # fmt: skip
    assert summary["direction"] == "xx-en"
    methods = summary["methods"]
    assert set(methods) == {"dense-untrained", "source-copy", "dense", "copy", "spri"}
    assert methods["dense"]["chrf"]["per_seed"] and len(methods["dense"]["chrf"]["per_seed"]) == 2
    assert len(methods["dense-untrained"]["chrf"]["per_seed"]) == 1  # untrained: one run, no seeds
    # copying the spoken (non-English) source scores something against the English references, and is a method
    test_rows = [json.loads(line) for line in (tiny_xx_en / "test.jsonl").read_text().splitlines()]
    copy_run = json.loads((out / "runs" / "source-copy-seed0.json").read_text())
    assert sorted(copy_run["hypotheses"]) == sorted(row["source_text"] for row in test_rows)
    for name in ("dense", "copy", "spri", "dense-untrained"):
        assert math.isfinite(methods[name]["cross_entropy"]["mean"]), name
        assert methods[name]["test_pairs"]["chrf"]["per_seed"], name  # scored on the user's pairs too
    paired = summary["paired"]
    assert paired["best_baseline"] == "copy"
    spri = paired["methods"]["spri"]
    assert {"vs_dense", "vs_copy"} <= set(spri)
    assert spri["vs_dense"]["low"] <= spri["vs_dense"]["mean"] <= spri["vs_dense"]["high"]
    assert spri["vs_dense"]["seeds"] == 2 and spri["vs_dense"]["sentences"] == len(test_rows)
    assert "ΔchrF++ vs dense" in (out / "summary.md").read_text()
    # the two-stage run went through SpriSeq2SeqTrainer's switch
    spri_run = json.loads((out / "runs" / "spri-seed0.json").read_text())
    assert [row["stage"] for row in spri_run["history"]] == [1, 1, 2, 2]
    assert (out / "models" / "spri-seed1" / "config.json").is_file()  # --keep-models


@pytest.mark.slow
def test_langs_restricts_every_split_and_is_part_of_the_spec(tiny_xx_en, tmp_path):
    preset = quality.replace(quality.PRESETS["tiny"], methods=("source-copy", "dense"), langs=("de",))
    out = tmp_path / "results"
    quality.run_benchmark(preset, tiny_xx_en, out, cache=tmp_path / "cache", log=lambda message: None)
    test_rows = [json.loads(line) for line in (tiny_xx_en / "test.jsonl").read_text().splitlines()]
    copy_run = json.loads((out / "runs" / "source-copy-seed0.json").read_text())
    assert sorted(copy_run["hypotheses"]) == sorted(row["source_text"] for row in test_rows if row["lang"] == "de")
    assert copy_run["spec"]["budget"]["langs"] == ["de"]
    dense_run = json.loads((out / "runs" / "dense-seed0.json").read_text())
    assert set(dense_run["metrics"]["per_lang"]) == {"de"}
    with pytest.raises(ValueError, match=r"--langs names \['xx'\]"):
        quality.run_benchmark(quality.replace(preset, langs=("xx",)), tiny_xx_en, tmp_path / "other",
                              cache=tmp_path / "cache", log=lambda message: None)  # fmt: skip


def test_batches_cut_the_encoder_states_at_their_longest_clip():
    from benchmarks.quality.data import Example, stack_states

    # cached states run past each clip's end; a batch keeps what its longest clip needs, every clip its own states
    states = {"a": torch.arange(10.0)[:, None].repeat(1, 2), "b": -torch.arange(10.0)[:, None].repeat(1, 2)}

    def example(audio, frames):
        return Example("de", audio, audio, [1], [1], "", "", frames)

    batch = stack_states([example("a", 3), example("b", 6)], states)
    assert batch.shape == (2, 6, 2)
    assert torch.equal(batch[0, :, 0], torch.arange(6.0)) and torch.equal(batch[1, :, 0], -torch.arange(6.0))
    assert stack_states([example("a", 4)], states).shape == (1, 4, 2)
    # a clip of unknown need keeps everything that is cached
    assert stack_states([example("a", 4), example("b", None)], states).shape == (2, 10, 2)


def test_stage1_ablations_reach_the_trainer_and_their_specs_only():
    """The stage-1 length and learning-rate ablations override the preset's schedule for their run alone; ablations
    without a rate of their own train at the one chosen for spri."""
    from benchmarks.quality.harness import run_spec
    from benchmarks.quality.training import training_arguments

    preset = quality.replace(quality.PRESETS["cpu-xx-en-ablations"], learning_rates=(("spri", 2e-4), ("dense", 1e-4)))
    device = torch.device("cpu")

    def arguments(name):
        return training_arguments(preset, quality.METHODS[name], 0, "unused", device)

    default, short, fast = arguments("spri"), arguments("spri-s1len0.25"), arguments("spri-s1lr30x")
    assert default.stage1_steps == preset.stage1_fraction == 0.5 and short.stage1_steps == 0.25
    assert default.learning_rate == short.learning_rate == fast.learning_rate == 2e-4
    assert fast.stage1_learning_rate == pytest.approx(30 * 2e-4) and fast.stage1_steps == 0.5
    assert arguments("spri-pr0.75").learning_rate == 2e-4
    spec = run_spec(quality.METHODS["spri-s1len0.25"], 0, preset, "m", "d", "test")
    assert spec["stage1"] == {"stage1_fraction": 0.25}
    assert "stage1" not in run_spec(quality.METHODS["spri"], 0, preset, "m", "d", "test")
    assert {"stage-1 length", "stage-1 learning rate"} <= set(quality.harness.ABLATIONS)

    # spri's stage-1 choice on dev reaches every two-stage run (under a method's own override) and their specs only
    preset = quality.replace(preset, stage1_choice=(("stage1_lr_multiplier", 3.0),))
    default, short, fast = arguments("spri"), arguments("spri-s1len0.25"), arguments("spri-s1lr30x")
    assert default.stage1_learning_rate == pytest.approx(3 * 2e-4) and default.stage1_steps == 0.5
    assert short.stage1_learning_rate == pytest.approx(3 * 2e-4) and short.stage1_steps == 0.25
    assert fast.stage1_learning_rate == pytest.approx(30 * 2e-4)
    assert run_spec(quality.METHODS["spri"], 0, preset, "m", "d", "test")["stage1"] == {"stage1_lr_multiplier": 3.0}
    for name in ("copy", "spri-stage2only", "dense"):
        assert "stage1" not in run_spec(quality.METHODS[name], 0, preset, "m", "d", "test"), name
        assert arguments(name).stage1_learning_rate is None, name


def test_stage1_ablations_pair_the_old_default_with_spri_chosen_schedule():
    """Once dev has chosen another stage 1 for spri, the stage-1 ablations that equal it are spri's own run and the
    defaults they replaced (0.5 of the steps, 10x) become ablations; the dev selection never reruns the defaults."""
    from benchmarks.quality.methods import STAGE1_CANDIDATES
    from benchmarks.quality.training import same_run_as_spri, stage1_schedule

    # every stage-1 variant of the tables (the preset itself runs one per setting; `--methods` runs the others)
    methods = quality.METHODS
    preset = quality.replace(quality.PRESETS["cpu-xx-en-ablations"], learning_rates=(("spri", 3e-4),),
                             methods=tuple(methods))
    assert stage1_schedule(preset, methods["spri"]) == (0.5, 10.0)
    assert [name for name in preset.methods if same_run_as_spri(preset, methods[name])] == [
        "spri-s1len0.5", "spri-s1lr10x"]
    assert "spri-s1len0.5" not in STAGE1_CANDIDATES and "spri-s1lr10x" not in STAGE1_CANDIDATES
    assert set(STAGE1_CANDIDATES) == {"spri-s1len0.25", "spri-s1len0.75", "spri-s1lr1x", "spri-s1lr3x", "spri-s1lr30x"}

    chosen = quality.replace(preset, stage1_choice=(("stage1_fraction", 0.25), ("stage1_lr_multiplier", 3.0)))
    assert stage1_schedule(chosen, methods["spri"]) == (0.25, 3.0)
    assert [name for name in chosen.methods if same_run_as_spri(chosen, methods[name])] == [
        "spri-s1len0.25", "spri-s1lr3x"]
    assert stage1_schedule(chosen, methods["spri-s1len0.5"]) == (0.5, 3.0)
    assert stage1_schedule(chosen, methods["spri-s1lr10x"]) == (0.25, 10.0)
    # other settings or another rate are not spri's run, whatever their stage 1
    assert not same_run_as_spri(chosen, methods["spri-div0"]) and not same_run_as_spri(chosen, methods["spri"])
    assert stage1_schedule(chosen, methods["spri-stage2only"]) is None
    own_rate = quality.replace(chosen, learning_rates=(("spri", 3e-4), ("spri-s1len0.25", 1e-4)))
    assert not same_run_as_spri(own_rate, methods["spri-s1len0.25"])


@pytest.mark.slow
def test_select_lr_chooses_each_rate_and_spri_stage1_on_dev(tiny_xx_en, tmp_path):
    from benchmarks.quality.harness import select_learning_rates
    from benchmarks.quality.methods import STAGE1_CANDIDATES

    preset = quality.replace(quality.PRESETS["tiny"], methods=("source-copy", "dense", "spri"))
    out = tmp_path / "lr-selection"
    result = select_learning_rates(preset, [1e-3, 1e-2], tiny_xx_en, out, torch.device("cpu"), tmp_path / "cache",
                                   log=lambda message: None)  # fmt: skip
    assert json.loads((out / "lr-selection.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["chosen"]) == {"dense", "spri"}  # trained methods only
    for name, rate in result["chosen"].items():
        scores = result["dev_chrf"][name]
        assert set(scores) == {"0.001", "0.01"} and scores[f"{rate:g}"] == max(scores.values()), name
    stage1 = result["stage1"]
    assert stage1["learning_rate"] == result["chosen"]["spri"]
    assert set(stage1["dev_chrf"]["stage1_fraction"]) == {"default", "0.25", "0.75"}
    assert set(stage1["dev_chrf"]["stage1_lr_multiplier"]) == {"default", "1", "3", "30"}
    for key, scores in stage1["dev_chrf"].items():
        best = max(scores.values())
        if key in stage1["chosen"]:
            assert scores[f"{stage1['chosen'][key]:g}"] == best > scores["default"]
        else:
            assert scores["default"] == best
    # the candidates trained at spri's chosen rate, on dev, seed 0
    for name in STAGE1_CANDIDATES:
        run = json.loads((out / "stage1" / "runs" / f"{name}-seed0.json").read_text())
        assert run["learning_rate"] == result["chosen"]["spri"] and run["spec"]["eval_split"] == "dev", name



def test_processes_sharing_the_encoder_state_cache_split_the_clips(tmp_path):
    import subprocess
    import threading

    from benchmarks.quality.data import encoder_states
    from benchmarks.quality.models import tiny_whisper

    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir()
    rows = []
    for index in range(5):
        with wave.open(str(tmp_path / "audio" / f"c{index}.wav"), "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(16000)
            handle.writeframes((rng.standard_normal(8000 + 800 * index) * 3000).astype("<i2").tobytes())
        rows.append({"audio": f"audio/c{index}.wav"})
    dense, processor, _ = tiny_whisper(["de"])
    cache = tmp_path / "cache"
    reference = encoder_states(dense, processor, tmp_path, rows, 60, tmp_path / "reference-cache", "cpu", log=print)

    def cache_file(row):
        import hashlib

        return cache / f"{hashlib.sha256((tmp_path / row['audio']).read_bytes()).hexdigest()}.pt"

    cache.mkdir()
    # clip 0: claimed by a process that is gone (taken over); clip 1: claimed by a live one (waited for)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache_file(rows[0]).with_suffix(".claim").write_text(gone.stdout.strip())
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache_file(rows[1]).with_suffix(".claim").write_text(str(alive.pid))
        result = {}
        worker = threading.Thread(target=lambda: result.update(states=encoder_states(
            dense, processor, tmp_path, rows, 60, cache, "cpu", log=print, batch_size=2, poll_s=0.05)))
        worker.start()
        worker.join(timeout=5)
        assert worker.is_alive(), "clip 1 is claimed by a live process: its states must be waited for"
        assert {path.name for path in cache.glob("*.pt")} == {cache_file(row).name for i, row in enumerate(rows) if i != 1}
        # the other process writes clip 1 (here: a marker the encoder never gives) and gives up its claim
        marker = torch.full_like(reference[rows[1]["audio"]], 7.0)
        torch.save(marker, cache_file(rows[1]))
        cache_file(rows[1]).with_suffix(".claim").unlink()
        worker.join(timeout=30)
        assert not worker.is_alive()
    finally:
        alive.kill()
    states = result["states"]
    assert torch.equal(states[rows[1]["audio"]], marker)  # taken from the cache, not computed again
    for i, row in enumerate(rows):
        if i != 1:
            assert torch.equal(states[row["audio"]], reference[row["audio"]])
    assert not list(cache.glob("*.claim")) and not list(cache.glob("*.tmp-*"))


def test_ablation_preset_runs_a_variant_of_every_open_setting():
    # one variant of every open setting: diversity, spri_mode, principal_ratio, partition, stage-1 length and rate, each over >= 3 seeds,
    # paired with the default (spri in the preset), next to dense and the trivial baselines
    from benchmarks.quality.methods import ABLATIONS

    preset = quality.PRESETS["cpu-xx-en-ablations"]
    assert len(preset.seeds) >= 3 and {"spri", "dense", "dense-untrained", "source-copy"} <= set(preset.methods)
    for title, names in ABLATIONS.items():
        assert [name for name in names if name != "spri" and name in preset.methods], title


@pytest.fixture(scope="module")
def tiny_two_task(tmp_path_factory):
    return _build_tiny(tmp_path_factory.mktemp("quality-two-task"), "covost_tiny_two_task",
                       dict(builder.TINY_XX_EN, disjoint_train=True, tasks=("transcribe", "translate")))  # fmt: skip


@pytest.mark.slow
def test_two_task_data_end_to_end_with_per_task_metrics_and_routing(tiny_two_task, tmp_path):
    """Each clip once per task (transcribe: the XX text; translate: the English), the task in the prompt; metrics
    per language and task, a macro per task, and the routing's language-, task- and written-language-expert MI."""
    preset = quality.replace(quality.PRESETS["tiny"], methods=("dense-untrained", "source-copy", "dense", "copy",
                                                               "copy-cm"))  # fmt: skip
    out = tmp_path / "results"
    summary = quality.run_benchmark(preset, tiny_two_task, out, cache=tmp_path / "cache", log=lambda message: None)
    # the compute-matched variant: copy's steps scaled by dense's training time over copy's (seed 0's runs)
    runs = {name: json.loads((out / "runs" / f"{name}-seed0.json").read_text()) for name in ("dense", "copy", "copy-cm")}
    matched = runs["copy-cm"]["spec"]["compute_matched"]
    ratio = runs["dense"]["timings"]["train_s"] / runs["copy"]["timings"]["train_s"]
    assert matched["time_ratio_dense_over_method"] == pytest.approx(ratio)
    assert runs["copy-cm"]["spec"]["budget"]["steps"] == matched["steps"] == max(1, round(preset.steps * ratio))
    assert len(runs["copy-cm"]["history"]) == matched["steps"]
    test_rows = [json.loads(line) for line in (tiny_two_task / "test.jsonl").read_text().splitlines()]
    groups = {f"{row['lang']}-{row['task']}" for row in test_rows}
    assert groups == {"de-transcribe", "de-translate", "sv-transcribe", "sv-translate"}
    for name in ("dense-untrained", "dense", "copy"):
        run = json.loads((out / "runs" / f"{name}-seed0.json").read_text())
        assert set(run["metrics"]["per_lang"]) == groups
        assert set(run["metrics"]["per_task"]) == {"transcribe", "translate"}
        for task in ("transcribe", "translate"):
            macro = [run["metrics"]["per_lang"][g]["chrf"] for g in groups if g.endswith(task)]
            assert run["metrics"]["per_task"][task]["chrf"] == pytest.approx(sum(macro) / len(macro))
    # copying the spoken text is the reference itself when transcribing, and not when translating
    copy = json.loads((out / "runs" / "source-copy-seed0.json").read_text())["metrics"]
    assert copy["per_task"]["transcribe"]["chrf"] == pytest.approx(100.0)
    assert copy["per_task"]["translate"]["chrf"] < 100.0
    # the task reached the decoder prompt: the examples of one clip differ in their task token only
    from benchmarks.quality.data import make_examples
    from benchmarks.quality.models import tiny_whisper

    _, processor, _ = tiny_whisper(["de", "sv"])
    examples = make_examples(test_rows, processor.tokenizer, preset, "xx-en")
    by_clip = {}
    for example in examples:
        by_clip.setdefault(example.audio, {})[example.task] = example.decoder_input_ids
    ids = processor.tokenizer.convert_tokens_to_ids
    for prompts in by_clip.values():
        assert prompts["transcribe"][2] == ids("<|transcribe|>") and prompts["translate"][2] == ids("<|translate|>")
    routing = json.loads((out / "runs" / "copy-seed0.json").read_text())["routing"]
    assert routing["tasks"] == ["transcribe", "translate"]
    for key in ("language_expert_mi_bits", "task_expert_mi_bits", "target_language_expert_mi_bits"):
        assert 0.0 <= routing["mean"][key] <= math.log2(3)
        assert key in summary["methods"]["copy"]["routing"]
    # paired differences within each task: the sentences of that task only (the evaluation order of the run files)
    per_task = summary["paired_per_task"]
    assert set(per_task) == {"transcribe", "translate"}
    dense_run, copy_run = runs["dense"], runs["copy"]
    order = [row["task"] for row in test_rows]
    for task in ("transcribe", "translate"):
        keep = [j for j, name in enumerate(order) if name == task]
        expected = sum(copy_run["sentence_chrf"][j] - dense_run["sentence_chrf"][j] for j in keep) / len(keep)
        stat = per_task[task]["methods"]["copy"]["vs_dense"]
        assert stat["sentences"] == len(keep) and stat["mean"] == pytest.approx(expected)
    text = (out / "summary.md").read_text()
    assert "## Per task" in text and "task-expert MI" in text and "## Paired differences per task" in text


def test_paired_by_task_pairs_the_sentences_of_each_task_only():
    from benchmarks.quality.harness import paired_by_task

    # four sentences, transcribe / translate alternating: copy gains 4 on transcribe and loses 2 on translate
    dense = [[50.0, 30.0, 60.0, 20.0], [52.0, 31.0, 58.0, 21.0]]
    copy = [[row[0] + 4, row[1] - 2, row[2] + 4, row[3] - 2] for row in dense]
    results = [{"method": name, "seed": seed, "sentence_chrf": rows[seed]}
               for name, rows in (("dense", dense), ("copy", copy)) for seed in (0, 1)]  # fmt: skip
    per_task = paired_by_task(results, ["transcribe", "translate", "transcribe", "translate"])
    assert set(per_task) == {"transcribe", "translate"}
    transcribe = per_task["transcribe"]["methods"]["copy"]["vs_dense"]
    translate = per_task["translate"]["methods"]["copy"]["vs_dense"]
    assert transcribe["mean"] == pytest.approx(4.0) and transcribe["sentences"] == 2 and transcribe["significant"]
    assert translate["mean"] == pytest.approx(-2.0) and translate["low"] == pytest.approx(-2.0)
    # data without tasks has no per-task table
    assert paired_by_task(results, [None] * 4) == {}


def test_a_compute_matched_two_stage_run_keeps_one_step_per_stage(tmp_path):
    """On a loaded machine a MoE may train 4x slower than dense: the tiny preset's 4 steps then shrink to 1, and a
    two-stage run of 1 step has no stage 2 (SpriTrainer refuses it). A two-stage method keeps 2; others may go to 1."""
    from benchmarks.quality.harness import compute_matched_steps, write_json

    preset = quality.PRESETS["tiny"]
    for name, seconds in (("dense", 1.0), ("spri", 10.0), ("copy", 10.0)):
        write_json(tmp_path / "runs" / f"{name}-seed0.json", {"timings": {"train_s": seconds}})
    spri, copy = (compute_matched_steps(preset, quality.METHODS[name], tmp_path) for name in ("spri-cm", "copy-cm"))
    assert quality.METHODS["spri-cm"].two_stage and not quality.METHODS["copy-cm"].two_stage
    assert (spri["steps"], copy["steps"]) == (2, 1)
    assert spri["time_ratio_dense_over_method"] == pytest.approx(0.1)
    write_json(tmp_path / "runs" / "spri-seed0.json", {"timings": {"train_s": 1.25}})  # not floored when not needed
    assert compute_matched_steps(preset, quality.METHODS["spri-cm"], tmp_path)["steps"] == round(4 / 1.25)


def test_interim_table_pools_compute_matched_runs_with_the_step_matched_grid(tmp_path):
    """`--status` on a grid with compute-matched variants: a `-cm` run trains fewer steps by design and pairs with dense
    on model, data and split; its name sorts first, yet the grid's step budget stays dense's (issue 35's folder)."""
    from benchmarks.quality.harness import interim_paired

    runs = tmp_path / "runs"
    runs.mkdir()
    dense = [50.0, 30.0, 60.0, 20.0]
    scores = {"dense": dense, "copy": [s - 1 for s in dense], "copy-cm": [s - 2 for s in dense],
              "dense-untrained": [s - 30 for s in dense]}  # fmt: skip

    def write(method, sentence_chrf, steps, train=True, compute_matched=None, model="m"):
        spec = {"method": method, "train": train, "budget": {"steps": steps}, "model": model, "data": "d",
                "eval_split": "test"}  # fmt: skip
        if compute_matched:
            spec["compute_matched"] = compute_matched
        result = {"method": method, "seed": 0, "spec": spec, "sentence_chrf": sentence_chrf,
                  "metrics": {"chrf": float(np.mean(sentence_chrf))}}  # fmt: skip
        (runs / f"{method}-seed0.json").write_text(json.dumps(result))

    write("copy-cm", scores["copy-cm"], 316, compute_matched={"steps": 316, "seed": 0})
    write("dense", scores["dense"], 400)
    write("copy", scores["copy"], 400)
    write("dense-untrained", scores["dense-untrained"], 400, train=False)
    table = interim_paired(tmp_path)
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert {"dense", "copy", "copy-cm", "dense-untrained"} <= set(rows)
    assert "-2.00 [-2.00, -2.00] (1 seeds)" in rows["copy-cm"] and "-1.00 [-1.00, -1.00]" in rows["copy"]
    # a step-matched run of another budget is still kept apart
    write("spri", scores["dense"], 300)
    assert "| spri |" not in interim_paired(tmp_path)


def test_mutual_information_bits_on_tables_with_a_known_answer():
    import torch

    from benchmarks.quality.routing import mutual_information_bits

    assert mutual_information_bits(torch.tensor([[5.0, 0.0], [0.0, 5.0]])) == pytest.approx(1.0)  # one bit
    assert mutual_information_bits(torch.tensor([[3.0, 3.0], [2.0, 2.0]])) == pytest.approx(0.0)  # independent
