"""benchmarks/data/build.py: the LibreOffice + espeak-ng En->XX speech translation set builder.

The end-to-end tests build the tiny presets from the real Debian catalogs (downloaded once with apt-get into the
default cache, ~/.cache/spri_hf/debs) and real espeak-ng speech; they are in the slow tier, and skip when either is
unavailable. The unit tests of the filters, splits and settings need neither.
"""

import json
import re
import shutil
import time
import wave
from pathlib import Path

import pytest

from benchmarks.data import build as builder


SPLITS = ("train", "dev", "test")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# fast unit tests (no packages needed)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ok",
    [
        ("The file name is too long for the target file system.", True),
        ("Do you want to save your changes?", True),
        ("Too short.", False),
        ("the sentence starts in lower case here.", False),
        ("This label has no final punctuation", False),
        ("The file %1 could not be opened.", False),
        ("The document %PRODUCTNAME cannot be read.", False),
        ("The value $(ARG1) is not valid here.", False),
        ("The row {0} could not be deleted.", False),
        ("Click <b>here</b> to open the file.", False),
        ("Choose ~File to open a document now.", False),
        ("Choose _Save to keep the document.", False),
        ("Open the file (&F) to continue now.", False),
        ("The first line.\nThe second line.", False),
        ("Do you want to delete the XX dialog?", False),
        ("Use Insert ▸ Field ▸ Date to add a date.", False),
        ("Please wait while the document is loading...", False),
    ],
)
def test_source_filter(text, ok):
    assert builder.is_source_sentence(text) is ok


def test_target_filter():
    en = "The path manager is not available."
    german = "Der Pfadmanager ist nicht verfügbar."
    assert builder.clean_target(german + "\n", en, "de") == german
    assert builder.clean_target("", en, "de") is None
    assert builder.clean_target(en, en, "id") is None  # untranslated copy
    assert builder.clean_target("Zeile 1\nZeile 2", en, "de") is None
    assert builder.clean_target("~Datei öffnen, bitte jetzt.", en, "de") is None
    assert builder.clean_target("The path manager is missing.", en, "ja") is None  # English left in a ja catalog
    # the Persian zero-width non-joiner is part of the writing system, not a control character
    persian = "نمی\u200cتوان نام را تغییر داد."
    assert builder.clean_target(persian, en, "fa") == persian


def test_split_is_disjoint_seeded_and_test_is_stable():
    sources = [f"Sentence number {i} is here." for i in range(500)]
    split = builder.split_sources(sources, 300, 40, 60, seed=0)
    assert [len(split[name]) for name in SPLITS] == [300, 40, 60]
    sets = {name: set(split[name]) for name in SPLITS}
    assert not sets["train"] & sets["dev"] and not sets["train"] & sets["test"] and not sets["dev"] & sets["test"]
    assert builder.split_sources(list(reversed(sources)), 300, 40, 60, seed=0) == split  # input order is irrelevant
    assert builder.split_sources(sources, 300, 40, 60, seed=1)["test"] != split["test"]
    # growing the train set leaves dev and test untouched
    bigger = builder.split_sources(sources, 400, 40, 60, seed=0)
    assert bigger["test"] == split["test"] and bigger["dev"] == split["dev"]
    assert set(split["train"]) <= set(bigger["train"])
    with pytest.raises(ValueError):
        builder.split_sources(sources, 450, 40, 60, seed=0)


def test_pool_merges_near_duplicates_and_prefers_complete_sources():
    per_lang = {
        "de": {"Open the file now.": "a", "Open the file, now.": "b", "Close the file now.": "c", "Save it now.": "d"},
        "ja": {"Open the file now.": "あ", "Close the file now.": "い"},
    }
    pool, info = builder.select_pool(per_lang, 2)
    assert pool == ["Close the file now.", "Open the file now."]
    assert info["near_duplicates_merged"] == 1 and info["candidate_sources_all_langs"] == 2
    pool, info = builder.select_pool(per_lang, 3)  # not enough complete sources: fall back to the widest coverage
    assert len(pool) == 3 and "Save it now." in pool and info["min_langs_per_source"] == 1
    with pytest.raises(ValueError, match="candidate English sources"):
        builder.select_pool(per_lang, 4)


def test_missing_packages_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "_apt_download", lambda packages, folder: "apt-get is not available")
    with pytest.raises(builder.MissingPackagesError) as info:
        builder.fetch_debs(["de", "zh-cn"], tmp_path)
    message = str(info.value)
    assert "libreoffice-l10n-de" in message and "libreoffice-l10n-zh-cn" in message
    assert "apt-get download" in message and "--debs" in message


# ---------------------------------------------------------------------------------------------------------------
# end to end on the tiny preset, from the real catalogs
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_debs():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    try:
        return builder.fetch_debs(builder.TINY["langs"])  # cached in ~/.cache/spri_hf/debs after the first run
    except builder.MissingPackagesError as error:
        pytest.skip(f"no libreoffice-l10n .debs: apt-get download failed and none are cached ({error})")


@pytest.mark.slow
def test_tiny_build_end_to_end(tmp_path, tiny_debs):
    out = tmp_path / "covost_tiny"
    started = time.time()
    assert builder.build(out, **builder.TINY) == out.resolve()
    first_seconds = time.time() - started

    manifest = json.loads((out / "manifest.json").read_text())
    langs = list(builder.TINY["langs"])
    assert manifest["version"] == 1 and manifest["langs"] == langs
    assert set(manifest["licenses"]) == {"text", "speech"} and "MPL-2.0" in manifest["licenses"]["text"]
    assert set(manifest["packages"]) == {f"libreoffice-l10n-{lang}" for lang in langs}
    assert manifest["espeak_ng_version"] and manifest["espeak_ng_version"] != "missing"
    assert set(manifest["hashes"]) == {"train.jsonl", "dev.jsonl", "test.jsonl", "audio"}

    rows = {split: read_jsonl(out / f"{split}.jsonl") for split in SPLITS}
    wanted = {split: builder.TINY[f"{split}_sources"] for split in SPLITS}
    for split in SPLITS:
        counts = manifest["counts"][split]
        assert counts["sources"] == wanted[split] == len({row["source_id"] for row in rows[split]})
        assert counts["pairs"] == len(rows[split]) == wanted[split] * len(langs)  # every tiny source has all 3
        assert counts["per_lang"] == {lang: sum(row["lang"] == lang for row in rows[split]) for lang in langs}
        for row in rows[split]:
            assert set(row) == {"id", "source_id", "lang", "en", "target", "audio"}
            assert row["id"] == f"{row['source_id']}-{row['lang']}" and row["lang"] in langs
            assert row["audio"] == f"audio/{row['source_id']}.wav"
            assert row["target"].strip() and row["target"] != row["en"]
            assert builder.is_source_sentence(row["en"])
        assert len({row["id"] for row in rows[split]}) == len(rows[split])

    # splits are made by English source: no source id or sentence in two splits
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not {r["source_id"] for r in rows[a]} & {r["source_id"] for r in rows[b]}
        assert not {r["en"] for r in rows[a]} & {r["en"] for r in rows[b]}

    # one 16 kHz mono wav per source, of a plausible sentence length
    audio = sorted((out / "audio").iterdir())
    assert [p.name for p in audio] == sorted({Path(r["audio"]).name for split in SPLITS for r in rows[split]})
    for path in audio:
        with wave.open(str(path), "rb") as handle:
            assert (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()) == (16000, 1, 2)
            assert handle.getnframes() > 16000 // 2  # > 0.5 s of speech

    # no work folders left beside it
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["covost_tiny"]

    # a second call is a no-op: same files (not rewritten), same hashes, quick
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    started = time.time()
    assert builder.build(out, **builder.TINY) == out.resolve()
    assert time.time() - started < max(2.0, first_seconds / 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamp
    assert json.loads((out / "manifest.json").read_text())["hashes"] == manifest["hashes"]

    # a damaged dataset is detected by its hashes and rebuilt identically (deterministic)
    (out / "test.jsonl").write_text("")
    builder.build(out, **builder.TINY)
    assert json.loads((out / "manifest.json").read_text())["hashes"] == manifest["hashes"]


@pytest.mark.slow
def test_failed_build_leaves_existing_dataset_intact(tmp_path, tiny_debs, monkeypatch):
    out = tmp_path / "covost_tiny"
    builder.build(out, **builder.TINY)
    before = (out / "manifest.json").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("synthesis failed")

    monkeypatch.setattr(builder, "synthesise", boom)
    with pytest.raises(RuntimeError, match="synthesis failed"):
        builder.build(out, **dict(builder.TINY, seed=1))  # different settings: a rebuild that fails half way
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["covost_tiny"]


@pytest.mark.slow
def test_cli_tiny(tmp_path, tiny_debs):
    out = tmp_path / "cli"
    assert builder.main(["--tiny", "--out", str(out), "--langs", "de,zh-CN", "--train-sources", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["langs"] == ["de", "zh-cn"] and manifest["counts"]["train"]["sources"] == 2
    assert {row["lang"] for row in read_jsonl(out / "train.jsonl")} == {"de", "zh-cn"}
    assert builder.main(["--tiny", "--out", str(out), "--langs", "xx"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# the xx-en direction (XX speech -> English text) and a user's own pairs
# ---------------------------------------------------------------------------------------------------------------


def wav_info(path):
    with wave.open(str(path), "rb") as handle:
        return (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()), handle.readframes(-1)


def test_voice_table_and_direction_settings():
    assert builder.xx_voice("zh_CN") == "cmn" and builder.xx_voice("de") == "de"
    assert set(builder.XX_VOICES) == set(builder.LANGS) - {"mn"}
    assert builder.XX_EN_LANGS == tuple(lang for lang in builder.LANGS if lang != "mn")
    with pytest.raises(ValueError, match=r"no voice for 'mn'.*de \(de\).*zh-cn \(cmn\)"):
        builder.xx_voice("mn")
    assert builder.normalise_direction(" XX-EN ") == "xx-en"
    with pytest.raises(ValueError, match="en-xx, xx-en"):
        builder.normalise_direction("en-en")
    en_xx = builder.requested_settings(4, 2, 2, ["de", "sv"], 0)
    assert builder.requested_settings(4, 2, 2, ["de", "sv"], 0, "en-xx") == en_xx
    # the en-xx settings keep their original keys, so datasets built before the xx-en direction stay valid
    old_keys = "builder_version train_sources dev_sources test_sources langs seed voice sampling_rate"
    assert set(en_xx) == set(old_keys.split()) | {"min_words", "max_words"}
    xx_en = builder.requested_settings(4, 2, 2, ["de", "sv"], 0, "xx-en")
    assert xx_en["direction"] == "xx-en" and xx_en["voices"] == {"de": "de", "sv": "sv"} and xx_en != en_xx


def test_xx_en_refuses_a_language_without_a_voice(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(ValueError, match=r"'mn'.*languages with a voice: de \(de\)"):
        builder.build(out, **dict(builder.TINY_XX_EN, langs=("de", "mn")), debs_dir=tmp_path / "debs")
    assert builder.main(["--tiny", "--direction", "xx-en", "--langs", "de,mn", "--out", str(out)]) == 1
    assert list(tmp_path.iterdir()) == []  # refused before any download or folder
    builder.requested_settings(1, 1, 1, ["mn"], 0)  # en-xx: mn is a target language like any other
    with pytest.raises(ValueError, match="'mn'"):
        builder.requested_settings(1, 1, 1, ["mn"], 0, "xx-en")


def write_pairs(path, rows):
    """A jsonl file of ``rows`` (dicts, or strings written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


SAVED, KEEP = "The file could not be saved.", "Do you want to keep the changes?"
PAIRS = [
    {"lang": "de", "en": SAVED, "source_text": "Die Datei konnte nicht gespeichert werden.", "target": SAVED},
    {"lang": "sv", "en": SAVED, "source_text": "Filen kunde inte sparas.", "target": SAVED, "note": "dropped"},
    {"id": "mine", "source_id": "q7", "lang": "de", "en": KEEP, "source_text": "Behalten?", "target": KEEP},
]


def test_read_pairs_completes_rows_in_the_builder_format(tmp_path):
    rows = builder.read_pairs(write_pairs(tmp_path / "pairs.jsonl", ["", *PAIRS]), "xx-en")
    assert [row["id"] for row in rows] == ["s00000-de", "s00000-sv", "mine"]
    assert [row["audio"] for row in rows] == ["audio/s00000-de.wav", "audio/s00000-sv.wav", "audio/q7-de.wav"]
    assert all(list(row) == ["id", "source_id", "lang", "en", "source_text", "target", "audio"] for row in rows)
    assert rows[1]["source_text"] == "Filen kunde inte sparas." and rows[1]["target"] == PAIRS[1]["target"]
    # en-xx: the English is spoken, once per source; source_text is not needed (nor kept)
    en_rows = [dict(row, lang="ZH_cn", target="文件无法保存。") for row in PAIRS[:1]] + [
        {"lang": "ja", "en": PAIRS[0]["en"], "target": "ファイルを保存できませんでした。"},
        {"lang": "mn", "source_id": "s00000", "en": "Another sentence to say.", "target": "x"},
    ]
    rows = builder.read_pairs(write_pairs(tmp_path / "en.jsonl", en_rows), "en-xx")
    assert [row["id"] for row in rows] == ["s00001-zh-cn", "s00001-ja", "s00000-mn"]  # s00000 is taken by the file
    assert [row["audio"] for row in rows] == ["audio/s00001.wav", "audio/s00001.wav", "audio/s00000.wav"]
    assert all(list(row) == ["id", "source_id", "lang", "en", "target", "audio"] for row in rows)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"lang": "de", "en": SAVED, "target": SAVED}, "line 3: missing field 'source_text'"),
        ({"en": SAVED, "source_text": "Offen.", "target": SAVED}, "line 3: missing field 'lang'"),
        ({"lang": "de", "en": SAVED, "source_text": " ", "target": SAVED}, "line 3: field 'source_text'"),
        ({"lang": "de", "en": SAVED, "source_text": "Offen.", "target": 3}, "line 3: field 'target'"),
        ({"lang": "mn", "en": SAVED, "source_text": "Нээлттэй.", "target": SAVED}, "line 3: field 'lang'"),
        ({**PAIRS[0], "source_id": "../up"}, "line 3: field 'source_id'"),
        ({**PAIRS[0], "source_id": "q7", "lang": "sv", "id": "mine"}, "line 3: id 'mine' is already used on line 2"),
        ({**PAIRS[2], "id": "other", "source_text": "Anders."}, "line 3: field 'source_text' differs from line 2"),
        ('{"lang": "de", "en": ', "line 3: not valid JSON"),
        ('["de", "The file is open."]', "line 3: expected a JSON object"),
    ],
)
def test_synthesise_pairs_refuses_bad_rows_and_writes_nothing(tmp_path, bad, message):
    pairs = write_pairs(tmp_path / "pairs.jsonl", [PAIRS[0], PAIRS[2], bad])
    with pytest.raises(ValueError, match=re.escape(f"{pairs}, {message}")):
        builder.synthesise_pairs(pairs, tmp_path / "out", "xx-en")
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]  # no folder, work folder or lock


def test_synthesise_pairs_refuses_an_empty_file(tmp_path):
    with pytest.raises(ValueError, match="no pairs"):
        builder.synthesise_pairs(write_pairs(tmp_path / "pairs.jsonl", ["", " "]), tmp_path / "out")
    with pytest.raises(ValueError, match="unknown direction"):
        builder.synthesise_pairs(tmp_path / "pairs.jsonl", tmp_path / "out", "de-en")
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


@pytest.fixture(scope="module")
def xx_en_debs():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    try:
        return builder.fetch_debs(builder.TINY_XX_EN["langs"])
    except builder.MissingPackagesError as error:
        pytest.skip(f"no libreoffice-l10n .debs: apt-get download failed and none are cached ({error})")


@pytest.mark.slow
def test_tiny_xx_en_build_end_to_end(tmp_path, xx_en_debs):
    out = tmp_path / "covost_tiny_xx_en"
    assert builder.build(out, **builder.TINY_XX_EN) == out.resolve()
    manifest = json.loads((out / "manifest.json").read_text())
    langs = list(builder.TINY_XX_EN["langs"])
    assert manifest["direction"] == manifest["settings"]["direction"] == "xx-en" and manifest["langs"] == langs
    assert manifest["settings"]["voices"] == {"de": "de", "sv": "sv"} and "voice" not in manifest["settings"]
    assert manifest["format"]["row"] == ["id", "source_id", "lang", "en", "source_text", "target", "audio"]
    assert set(manifest["packages"]) == {f"libreoffice-l10n-{lang}" for lang in langs}

    rows = {split: read_jsonl(out / f"{split}.jsonl") for split in SPLITS}
    for split in SPLITS:
        sources = builder.TINY_XX_EN[f"{split}_sources"]
        counts = manifest["counts"][split]
        assert counts["sources"] == sources == len({row["source_id"] for row in rows[split]})
        assert counts["pairs"] == len(rows[split]) == sources * len(langs)
        assert counts["per_lang"] == {lang: sources for lang in langs}
        for row in rows[split]:
            assert list(row) == manifest["format"]["row"]
            assert row["id"] == f"{row['source_id']}-{row['lang']}" and row["lang"] in langs
            assert row["audio"] == f"audio/{row['source_id']}-{row['lang']}.wav"
            assert row["target"] == row["en"] and builder.is_source_sentence(row["en"])  # the label is the English
            assert row["source_text"].strip() and row["source_text"] != row["en"]
        assert len({row["id"] for row in rows[split]}) == len(rows[split])

    # splits are made by English source: no English sentence (and so none of its translations) in two splits
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not {r["source_id"] for r in rows[a]} & {r["source_id"] for r in rows[b]}
        assert not {r["en"] for r in rows[a]} & {r["en"] for r in rows[b]}
        assert not {r["source_text"] for r in rows[a]} & {r["source_text"] for r in rows[b]}

    # one 16 kHz mono clip per pair; the languages of one source sound different
    every = [row for split in SPLITS for row in rows[split]]
    assert sorted(p.name for p in (out / "audio").iterdir()) == sorted(Path(row["audio"]).name for row in every)
    pcm = {}
    for row in every:
        path = out / row["audio"]
        assert path.stat().st_size > 44
        shape, pcm[row["id"]] = wav_info(path)
        assert shape == (16000, 1, 2) and len(pcm[row["id"]]) > 16000  # > 0.5 s of speech
    for sid in {row["source_id"] for row in every}:
        assert pcm[f"{sid}-de"] != pcm[f"{sid}-sv"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["covost_tiny_xx_en"]


@pytest.mark.slow
def test_disjoint_train_gives_each_language_its_own_sources(tmp_path, xx_en_debs):
    settings = dict(builder.TINY_XX_EN, train_sources=3)
    shared = builder.build(tmp_path / "shared", **settings)
    disjoint = builder.build(tmp_path / "disjoint", disjoint_train=True, **settings)
    langs = list(settings["langs"])
    manifest = json.loads((disjoint / "manifest.json").read_text())
    assert manifest["settings"]["train_sources_per_language"] == "disjoint"
    assert manifest["counts"]["train"]["per_lang"] == {lang: 3 for lang in langs}
    train = read_jsonl(disjoint / "train.jsonl")
    by_lang = {lang: {row["source_id"] for row in train if row["lang"] == lang} for lang in langs}
    assert all(len(ids) == 3 for ids in by_lang.values()) and not by_lang["de"] & by_lang["sv"]
    assert len({row["en"] for row in train}) == 3 * len(langs)  # every training target once
    # dev and test are the shared build's, row for row (every language speaks every source), and disjoint from train
    for split in ("dev", "test"):
        assert read_jsonl(disjoint / f"{split}.jsonl") == read_jsonl(shared / f"{split}.jsonl")
        assert not {r["source_id"] for r in train} & {r["source_id"] for r in read_jsonl(disjoint / f"{split}.jsonl")}
    with pytest.raises(ValueError, match="xx-en"):
        builder.requested_settings(3, 2, 2, ["de"], 0, "en-xx", disjoint_train=True)


@pytest.mark.slow
def test_directions_do_not_share_a_cache(tmp_path, xx_en_debs):
    out = tmp_path / "data"
    builder.build(out, **builder.TINY_XX_EN)
    xx_en = {split: read_jsonl(out / f"{split}.jsonl") for split in SPLITS}
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    builder.build(out, **builder.TINY_XX_EN)  # same settings: reused, not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamp

    builder.build(out, **dict(builder.TINY_XX_EN, direction="en-xx"))  # same counts, languages, seed: rebuilt
    manifest = json.loads((out / "manifest.json").read_text())
    assert "direction" not in manifest and "direction" not in manifest["settings"]
    en_xx = {split: read_jsonl(out / f"{split}.jsonl") for split in SPLITS}
    for row in (row for split in SPLITS for row in en_xx[split]):
        assert "source_text" not in row and row["audio"] == f"audio/{row['source_id']}.wav"
    # the same English sources in the same splits, the translation spoken in xx-en being the en-xx target
    for split in SPLITS:
        assert [(r["id"], r["en"], r["target"]) for r in en_xx[split]] == [
            (r["id"], r["en"], r["source_text"]) for r in xx_en[split]
        ]

    builder.build(out, **builder.TINY_XX_EN)  # and back
    assert json.loads((out / "manifest.json").read_text())["direction"] == "xx-en"
    assert {split: read_jsonl(out / f"{split}.jsonl") for split in SPLITS} == xx_en


@pytest.mark.slow
def test_cli_tiny_xx_en(tmp_path, xx_en_debs):
    out = tmp_path / "cli"
    assert builder.main(["--tiny", "--direction", "xx-en", "--out", str(out), "--test-sources", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["direction"] == "xx-en" and manifest["langs"] == ["de", "sv"]
    assert (manifest["counts"]["test"]["sources"], manifest["counts"]["test"]["pairs"]) == (1, 2)


@pytest.fixture(scope="module")
def espeak():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")


def boom(*args, **kwargs):
    raise RuntimeError("synthesis failed")


@pytest.mark.slow
def test_synthesise_pairs_end_to_end(tmp_path, espeak, monkeypatch):
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "mine"
    assert builder.synthesise_pairs(pairs, out, "xx-en") == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == ["audio", "manifest.json", "test.jsonl"]
    rows = read_jsonl(out / "test.jsonl")
    assert rows == builder.read_pairs(pairs, "xx-en")
    assert sorted(p.name for p in (out / "audio").iterdir()) == ["q7-de.wav", "s00000-de.wav", "s00000-sv.wav"]
    pcm = {}
    for row in rows:
        shape, pcm[row["id"]] = wav_info(out / row["audio"])
        assert shape == (16000, 1, 2) and len(pcm[row["id"]]) > 16000
    assert pcm["s00000-de"] != pcm["s00000-sv"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["direction"] == "xx-en" and manifest["counts"]["test"]["pairs"] == 3
    assert manifest["settings"]["voices"] == {"de": "de", "sv": "sv"}

    # the same file again: reused; a changed file: respoken
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    builder.synthesise_pairs(pairs, out, "xx-en")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamp
    write_pairs(pairs, PAIRS[:2])
    builder.synthesise_pairs(pairs, out, "xx-en")
    assert len(read_jsonl(out / "test.jsonl")) == 2 and len(list((out / "audio").iterdir())) == 2

    # a bad file, or a synthesis that fails half way, leaves the folder as it was and no work folder
    before = (out / "manifest.json").read_text()
    bad = write_pairs(tmp_path / "bad.jsonl", [{"lang": "de", "en": SAVED, "target": SAVED}])
    with pytest.raises(ValueError, match="line 1: missing field 'source_text'"):
        builder.synthesise_pairs(bad, out, "xx-en")
    monkeypatch.setattr(builder, "synthesise", boom)
    with pytest.raises(RuntimeError, match="synthesis failed"):
        builder.synthesise_pairs(write_pairs(pairs, PAIRS), out, "xx-en")  # a changed file: a rebuild that fails
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == before
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == ["bad.jsonl", "mine", "pairs.jsonl"]

    # en-xx: the English is spoken once per source with the English voice
    en_out = tmp_path / "mine_en"
    en_rows = [{key: value for key, value in row.items() if key != "source_text"} for row in PAIRS]
    en_pairs = write_pairs(tmp_path / "en.jsonl", en_rows)
    assert builder.main(["--pairs", str(en_pairs), "--out", str(en_out), "--direction", "en-xx"]) == 0
    rows = read_jsonl(en_out / "test.jsonl")
    assert [row["audio"] for row in rows] == ["audio/s00000.wav", "audio/s00000.wav", "audio/q7.wav"]
    assert sorted(p.name for p in (en_out / "audio").iterdir()) == ["q7.wav", "s00000.wav"]
    assert json.loads((en_out / "manifest.json").read_text())["settings"]["voice"] == "en"

    # a folder it did not write (a built dataset included) is never replaced
    for name, manifest in (("built", {"version": 1, "settings": {}}), ("other", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / ("manifest.json" if manifest else "notes.txt")).write_text(json.dumps(manifest))
        with pytest.raises(FileExistsError, match="not a folder of spoken pairs"):
            builder.synthesise_pairs(pairs, tmp_path / name, "xx-en")
        assert [p.name for p in (tmp_path / name).iterdir()] == ["manifest.json" if manifest else "notes.txt"]


@pytest.mark.slow
def test_two_task_build_has_each_clip_once_per_task(tmp_path, xx_en_debs):
    """`--tasks transcribe,translate`: every clip of the xx-en build twice in its split, the task in the row, the
    target the XX text (transcribe) or the English (translate); splits disjoint by source; one wav per clip."""
    plain = builder.build(tmp_path / "plain", disjoint_train=True, **builder.TINY_XX_EN)
    out = tmp_path / "tasks"
    assert builder.main(["--tiny", "--direction", "xx-en", "--disjoint-train", "--tasks", "transcribe,translate",
                         "--out", str(out)]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["tasks"] == ["transcribe", "translate"] and manifest["format"]["row"][-1] == "task"
    for split in SPLITS:
        clips = read_jsonl(plain / f"{split}.jsonl")
        rows = read_jsonl(out / f"{split}.jsonl")
        assert manifest["counts"][split]["per_task"] == {"transcribe": len(clips), "translate": len(clips)}
        assert manifest["counts"][split]["audio_seconds"] == json.loads((plain / "manifest.json").read_text())[
            "counts"][split]["audio_seconds"]  # fmt: skip
        assert sorted(r["audio"] for r in rows) == sorted(r["audio"] for r in clips for _ in range(2))
        for clip in clips:
            by_task = {r["task"]: r for r in rows if r["audio"] == clip["audio"]}
            assert by_task["transcribe"]["target"] == clip["source_text"] and by_task["translate"]["target"] == clip["en"]
            assert by_task["transcribe"]["id"] == clip["id"] + "-transcribe"
        assert len({r["id"] for r in rows}) == len(rows)
    train, test = (read_jsonl(out / f"{split}.jsonl") for split in ("train", "test"))
    assert not {r["source_id"] for r in train} & {r["source_id"] for r in test}
    assert sorted(p.name for p in (out / "audio").iterdir()) == sorted(p.name for p in (plain / "audio").iterdir())
    with pytest.raises(ValueError, match="direction='xx-en'"):
        builder.requested_settings(3, 2, 2, ["de"], 0, "en-xx", tasks=("transcribe",))
    with pytest.raises(ValueError, match="'summarise'"):
        builder.requested_settings(3, 2, 2, ["de"], 0, "xx-en", tasks=("summarise",))
