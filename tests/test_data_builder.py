"""benchmarks/data/build.py: the LibreOffice + espeak-ng En->XX speech translation set builder.

The end-to-end test builds the tiny preset from the real Debian catalogs (downloaded once with apt-get into the
default cache, ~/.cache/spri_hf/debs) and real espeak-ng speech; it skips when neither is available.
"""

import json
import shutil
import sys
import time
import wave
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data import build as builder  # noqa: E402


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


def test_cli_tiny(tmp_path, tiny_debs):
    out = tmp_path / "cli"
    assert builder.main(["--tiny", "--out", str(out), "--langs", "de,zh-CN", "--train-sources", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["langs"] == ["de", "zh-cn"] and manifest["counts"]["train"]["sources"] == 2
    assert {row["lang"] for row in read_jsonl(out / "train.jsonl")} == {"de", "zh-cn"}
    assert builder.main(["--tiny", "--out", str(out), "--langs", "xx"]) == 1
