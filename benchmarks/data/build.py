"""Build a small CoVoST2-shaped English speech -> XX translation set from Debian's LibreOffice catalogs.

One command, cached and idempotent::

    python -m benchmarks.data.build                       # default: 300 train / 40 dev / 60 test sources x 15 langs
    python -m benchmarks.data.build --tiny                # 3 languages, 4 / 2 / 2 sources (seconds; used by the tests)
    python -m benchmarks.data.build --direction xx-en     # XX speech -> English text, 14 langs (covost_mini_xx_en)
    python -m benchmarks.data.build --tiny --direction xx-en            # de + sv, 4 / 2 / 2 sources
    python -m benchmarks.data.build --pairs my.jsonl --out DIR --direction xx-en   # speak your own test pairs

Text: Debian's ``libreoffice-l10n-<lang>`` packages (MPL-2.0) ship gettext ``.mo`` catalogs of LibreOffice's UI
and help strings; the msgids are English, the msgstrs human translations. For the 15 CoVoST2 En->XX targets the
package suffix is the CoVoST2 code lower-cased (``zh-CN`` -> ``libreoffice-l10n-zh-cn``); inside the package the
catalogs live under ``usr/lib/libreoffice/program/resource/<dir>/LC_MESSAGES/`` where ``<dir>`` is the code, except
``zh_CN`` for zh-cn (the Catalan package also ships ``ca@valencia``, which is ignored). The .deb files are fetched
with ``apt-get download`` into a cache folder (``~/.cache/spri_hf/debs`` by default) and read in Python (ar + tar);
``--debs DIR`` points at pre-downloaded ones.

Speech: every selected English source sentence is spoken once with espeak-ng and stored as a 16 kHz mono 16-bit
WAV (``audio/<source_id>.wav``), using ``benchmarks/real_models.py``'s ``espeak_clip``.

Output (``<out>/``): ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` (one pair per line: ``id``, ``source_id``,
``lang``, ``en``, ``target``, ``audio``), ``audio/*.wav`` and ``manifest.json`` (counts, settings, licenses,
package versions and hashes). Splits are made by English source sentence: no source is in two splits.

Direction: ``--direction en-xx`` (the default) is the set above. ``--direction xx-en`` turns it around: every
(source, language) pair gets its own clip, the *translation* spoken with the espeak-ng voice of its language
(``XX_VOICES``; espeak-ng has no Mongolian voice, so ``mn`` is refused), stored as ``audio/<source_id>-<lang>.wav``.
Its rows have the same fields plus ``source_text`` (the XX sentence that was spoken); ``target`` is then the
English sentence (the label), ``en`` stays the English and ``lang`` is the spoken language. Its manifest, and the
manifest's settings (so a cached build of one direction is never taken for the other), carry
``"direction": "xx-en"``; an en-xx manifest has no ``direction`` key (its format is unchanged). Splits are still
made by English source, so no translation of a test sentence is in train; the same counts, languages and seed
select the same English sources in both directions. espeak-ng's ja voice reads only kana (each kanji comes out as
the English "Chinese letter"), so ja speech is poor; it is kept, with a warning (``WEAK_VOICES``).

Your own pairs: ``synthesise_pairs(pairs_file, out_dir, direction)`` (``--pairs FILE --out DIR``) speaks a jsonl of
pairs in the row format above (``lang``, ``en``, ``target``, for xx-en also ``source_text``; ``id`` and
``source_id`` optional) into ``<out_dir>/test.jsonl`` + ``<out_dir>/audio/`` with the same voices and file names.

The dataset is built in a hidden sibling folder and renamed into place only when complete; a build whose
``manifest.json`` has the requested settings and verifying hashes is left alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import gettext
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import wave
from collections import Counter
from pathlib import Path

import numpy as np


MANIFEST_VERSION = 1
# bump whenever the filtering/selection/synthesis changes, so cached builds are rebuilt
BUILDER_VERSION = 1

# CoVoST2 En->XX target languages (zh-CN written zh-cn)
LANGS = ("de", "ca", "zh-cn", "fa", "et", "mn", "tr", "ar", "sv", "lv", "sl", "ta", "ja", "id", "cy")
# languages whose targets must be mostly in a non-Latin script (catches untranslated copies of the English)
NON_LATIN = {"zh-cn", "fa", "mn", "ar", "ta", "ja"}
RESOURCE_DIRS = {"zh-cn": "zh_CN"}

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = DATA_DIR / "covost_mini"
TINY_OUT = DATA_DIR / "covost_tiny"
TINY = dict(train_sources=4, dev_sources=2, test_sources=2, langs=("de", "ja", "ar"))

DIRECTIONS = ("en-xx", "xx-en")
# espeak-ng voice speaking each language's translations (xx-en); espeak-ng has none for Mongolian (mn)
# fmt: off
XX_VOICES = {
    "de": "de", "ca": "ca", "zh-cn": "cmn", "fa": "fa", "et": "et", "tr": "tr", "ar": "ar", "sv": "sv",
    "lv": "lv", "sl": "sl", "ta": "ta", "ja": "ja", "id": "id", "cy": "cy",
}
# fmt: on
XX_EN_LANGS = tuple(lang for lang in LANGS if lang in XX_VOICES)
# voices that exist but speak these languages badly (logged when used; the clips are still made)
WEAK_VOICES = {"ja": "espeak-ng's ja voice reads only kana: every kanji is spoken as the English 'Chinese letter'"}
XX_EN_OUT = DATA_DIR / "covost_mini_xx_en"
TINY_XX_EN_OUT = DATA_DIR / "covost_tiny_xx_en"
# two Latin-script languages with distinct espeak-ng voices, both in Debian's libreoffice-l10n-*
TINY_XX_EN = dict(train_sources=4, dev_sources=2, test_sources=2, langs=("de", "sv"), direction="xx-en")

SAMPLING_RATE = 16000
VOICE = "en"
MIN_WORDS, MAX_WORDS = 4, 25
WORKERS = 2  # espeak-ng processes at once (shared 2-core machines)

LICENSES = {
    "text": "MPL-2.0 (LibreOffice translations, Debian libreoffice-l10n-*)",
    "speech": "synthesised with espeak-ng (GPL-3.0 program; output not covered)",
}
SPLITS = ("train", "dev", "test")


class MissingPackagesError(RuntimeError):
    """A Debian package the builder needs could neither be found in the deb folder nor downloaded."""


def log(message: str) -> None:
    print(f"[benchmarks.data] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# languages and packages
# ----------------------------------------------------------------------------------------------------------------


def normalise_lang(code: str) -> str:
    lang = code.strip().lower().replace("_", "-")
    if lang not in LANGS:
        raise ValueError(f"unknown language {code!r}; choose from {', '.join(LANGS)}")
    return lang


def normalise_direction(direction: str) -> str:
    value = str(direction).strip().lower()
    if value not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
    return value


def xx_voice(lang: str) -> str:
    """The espeak-ng voice that speaks ``lang``'s translations in the xx-en direction."""
    lang = normalise_lang(lang)
    if lang not in XX_VOICES:
        raise ValueError(
            f"espeak-ng has no voice for {lang!r}, so it cannot be a spoken xx-en source language; "
            f"languages with a voice: {', '.join(f'{code} ({voice})' for code, voice in XX_VOICES.items())}"
        )
    return XX_VOICES[lang]


def package_name(lang: str) -> str:
    return f"libreoffice-l10n-{normalise_lang(lang)}"


def default_debs_dir() -> Path:
    if os.environ.get("SPRI_HF_DEBS"):
        return Path(os.environ["SPRI_HF_DEBS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "spri_hf" / "debs"


def _find_deb(folder: Path, package: str) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(folder.glob(f"{package}_*.deb"), key=lambda p: (p.stat().st_mtime, p.name))
    return found[-1] if found else None  # the newest download when several versions are there


def _apt_download(packages: list[str], folder: Path) -> str:
    """``apt-get download`` into ``folder`` via a scratch folder (no partial .deb is left); returns the error text."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    folder.mkdir(parents=True, exist_ok=True)
    errors = ""
    for attempt in range(2):
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
            os.chmod(scratch, 0o755)
            command = ["apt-get", "download", "-q", *packages]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                command[1:1] = ["-o", "APT::Sandbox::User=root"]  # no "_apt cannot access" warning as root
            result = subprocess.run(command, cwd=scratch, capture_output=True, text=True)
            for deb in Path(scratch).glob("*.deb"):
                os.replace(deb, folder / deb.name)
            if result.returncode == 0:
                return ""
            errors = (result.stderr or result.stdout).strip()
        # the package lists may be missing or stale: refresh them once when we are allowed to
        if attempt == 0 and os.geteuid() == 0 and "Unable to locate" in errors:
            log("apt-get could not locate the packages; running apt-get update once")
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            continue
        break
    return errors


def fetch_debs(langs, debs_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The ``libreoffice-l10n-*`` .deb of each language: found in ``debs_dir`` (default: the cache) or downloaded."""
    folder = Path(debs_dir) if debs_dir is not None else default_debs_dir()
    langs = [normalise_lang(lang) for lang in langs]
    missing = [package_name(lang) for lang in langs if _find_deb(folder, package_name(lang)) is None]
    if missing:
        log(f"downloading {len(missing)} package(s) into {folder}: {' '.join(missing)}")
        error = _apt_download(missing, folder)
        still = [name for name in missing if _find_deb(folder, name) is None]
        if still:
            raise MissingPackagesError(
                f"missing Debian package(s): {' '.join(still)}\n"
                f"  apt-get download failed: {error or 'no .deb was written'}\n"
                f"  fetch them on a Debian/Ubuntu machine with\n"
                f"    apt-get update && apt-get download {' '.join(still)}\n"
                f"  and pass the folder holding the .deb files with --debs DIR (looked in {folder})"
            )
    return {lang: _find_deb(folder, package_name(lang)) for lang in langs}


# ----------------------------------------------------------------------------------------------------------------
# reading .deb files (ar archive of control.tar.* and data.tar.*)
# ----------------------------------------------------------------------------------------------------------------


def _ar_members(path: Path) -> dict[str, bytes]:
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a .deb (ar) archive")
    members, pos = {}, 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _member_tar(path: Path, prefix: str) -> tarfile.TarFile:
    members = _ar_members(path)
    name = next((key for key in members if key.startswith(prefix)), None)
    if name is None:
        raise ValueError(f"{path}: no {prefix}* member")
    if name.endswith((".tar", ".gz", ".xz", ".bz2")):
        return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")
    # e.g. zstd-compressed members (Ubuntu): let dpkg-deb decompress
    if shutil.which("dpkg-deb") is None:
        raise MissingPackagesError(f"{path}: {name} needs dpkg-deb to decompress (apt-get install -y dpkg)")
    flag = "--ctrl-tarfile" if prefix == "control" else "--fsys-tarfile"
    raw = subprocess.run(["dpkg-deb", flag, str(path)], check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")


def deb_control(path: Path) -> dict[str, str]:
    with _member_tar(path, "control.tar") as tar:
        for member in tar:
            if member.name.lstrip("./") == "control":
                text = tar.extractfile(member).read().decode("utf-8")
                return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line and line[0] != " ")
    raise ValueError(f"{path}: no control file")


def read_catalogs(path: Path, lang: str):
    """Yield ``(catalog, context, msgid, msgstr)`` for every singular entry of the language's ``.mo`` files."""
    folder = f"usr/lib/libreoffice/program/resource/{RESOURCE_DIRS.get(lang, lang)}/LC_MESSAGES/"
    with _member_tar(path, "data.tar") as tar:
        files = {}
        for member in tar:
            name = member.name.lstrip("./")
            if member.isfile() and name.startswith(folder) and name.endswith(".mo"):
                files[name[len(folder) :]] = tar.extractfile(member).read()
    if not files:
        raise ValueError(f"{path}: no catalogs under {folder}")
    for catalog in sorted(files):
        entries = gettext.GNUTranslations(io.BytesIO(files[catalog]))._catalog
        for key in sorted(entries, key=str):
            if not isinstance(key, str) or not key:  # plural forms and the header
                continue
            context, _, msgid = key.rpartition("\x04")
            yield catalog[:-3], context, msgid, entries[key]


# ----------------------------------------------------------------------------------------------------------------
# filtering
# ----------------------------------------------------------------------------------------------------------------

# printf/LibreOffice/ICU style placeholders: %s %1 %PRODUCTNAME %% $(ARG1) ${x} $1 {0} {name} #1 @x@
PLACEHOLDER = re.compile(r"%\w|%%|\$[\w({]|\{\w*\}|#\d|@\w+@|\bX{2,}\b")
# accelerators and entities: ~File, _File, (&F), &amp;
ACCELERATOR = re.compile(r"[~_]|&\w")
MARKUP = re.compile(r"<[^>]*>|[<>]")
# characters that are placeholders here ('#') or read badly aloud (menu-path arrows and other symbols)
SOURCE_FORBIDDEN = set("{}[]|\\*=^`#▸→")


def _clean(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def _has_control(text: str) -> bool:
    """Control, surrogate or private-use characters (format characters such as the Persian ZWNJ are fine)."""
    return any(unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") for c in text)


def is_source_sentence(en: str) -> bool:
    """Sentence-like English: 4-25 words, capitalised, ends in . ? or !, no placeholders/markup/accelerators."""
    if not en or en != en.strip() or _has_control(en):
        return False
    if not MIN_WORDS <= len(en.split()) <= MAX_WORDS:
        return False
    if not en[0].isupper() or en[-1] not in ".?!" or en.endswith("..") or "…" in en:
        return False
    if PLACEHOLDER.search(en) or ACCELERATOR.search(en) or MARKUP.search(en) or SOURCE_FORBIDDEN & set(en):
        return False
    if "://" in en or "www." in en.lower() or "%" in en or "$" in en:
        return False
    if any(unicodedata.category(c) in ("So", "Sk") for c in en):
        return False
    return True


def clean_target(target: str, en: str, lang: str) -> str | None:
    """The usable translation of ``en`` in ``lang``, or None."""
    target = _clean(target)  # a stray leading/trailing newline is dropped; inner ones reject the pair
    if not target or target.casefold() == en.casefold() or _has_control(target):
        return None
    if PLACEHOLDER.search(target) or ACCELERATOR.search(target) or MARKUP.search(target):
        return None
    if lang in NON_LATIN:
        letters = [c for c in target if c.isalpha()]
        if not letters or sum(c.isascii() for c in letters) > 0.5 * len(letters):
            return None
    return target


def near_duplicate_key(en: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", en.lower()).strip()


def language_pairs(deb: Path, lang: str) -> tuple[dict[str, str], dict[str, int]]:
    """English source -> chosen translation for one language, plus counts for the report.

    When one English string has several translations (different contexts), the most frequent wins, ties going to
    the first in (catalog, context) order.
    """
    options: dict[str, Counter] = {}
    stats = Counter()
    for _catalog, _context, msgid, msgstr in read_catalogs(deb, lang):
        stats["entries"] += 1
        en = _clean(msgid)
        if not is_source_sentence(en):
            continue
        stats["sentence_like"] += 1
        target = clean_target(msgstr, en, lang)
        if target is not None:
            options.setdefault(en, Counter())[target] += 1
    pairs = {en: counts.most_common(1)[0][0] for en, counts in options.items()}
    stats["candidates"] = len(pairs)
    return pairs, dict(stats)


def select_pool(per_lang: dict[str, dict[str, str]], needed: int) -> tuple[list[str], dict]:
    """English sources to split: those translated in every language, else the ones covering the most languages.

    Near-duplicate English strings (equal up to case and punctuation) count as one source, so no near-copy of a
    test sentence can sit in train; the variant with the widest coverage (then the smallest string) is kept.
    """
    langs = list(per_lang)
    coverage = Counter(en for pairs in per_lang.values() for en in pairs)
    groups: dict[str, list[str]] = {}
    for en in coverage:
        groups.setdefault(near_duplicate_key(en), []).append(en)
    distinct = [min(group, key=lambda s: (-coverage[s], s)) for group in groups.values()]
    complete = sorted(en for en in distinct if coverage[en] == len(langs))
    info = {
        "candidate_sources_any_lang": len(distinct),
        "near_duplicates_merged": len(coverage) - len(distinct),
        "candidate_sources_all_langs": len(complete),
        "coverage_histogram": {str(k): v for k, v in sorted(Counter(coverage[en] for en in distinct).items())},
    }
    if len(complete) >= needed:
        info["pool"] = "all languages"
        return complete, info
    if len(distinct) < needed:
        raise ValueError(
            f"only {len(distinct)} candidate English sources (any language), {len(complete)} with all "
            f"{len(langs)} languages; {needed} requested: lower --train-sources/--dev-sources/--test-sources"
        )
    ranked = sorted(distinct, key=lambda s: (-coverage[s], s))[:needed]
    info["pool"] = f"most languages: {len(complete)} complete + {needed - len(complete)} partial"
    info["min_langs_per_source"] = min(coverage[en] for en in ranked)
    log(
        f"only {len(complete)} sources are translated in all {len(langs)} languages (< {needed} needed): using "
        f"the {needed} sources covering the most languages (at least {info['min_langs_per_source']})"
    )
    return sorted(ranked), info


def split_sources(sources, train: int, dev: int, test: int, seed: int) -> dict[str, list]:
    """Seeded shuffle of the sources, then test, dev and train slices (disjoint by construction).

    The test slice is taken first, so with a fixed pool and seed it does not depend on the train size.
    """
    if train + dev + test > len(sources):
        raise ValueError(f"{train + dev + test} sources requested, {len(sources)} available")
    order = sorted(sources)
    random.Random(seed).shuffle(order)
    return {"test": order[:test], "dev": order[test : test + dev], "train": order[test + dev : test + dev + train]}


# ----------------------------------------------------------------------------------------------------------------
# speech
# ----------------------------------------------------------------------------------------------------------------


def _espeak_clip():
    if shutil.which("espeak-ng") is None:
        raise MissingPackagesError("espeak-ng is not installed: apt-get update && apt-get install -y espeak-ng")
    from ..real_models import espeak_clip  # noqa: PLC0415  (imports torch: only when synthesising)

    return espeak_clip


def espeak_version() -> str:
    if shutil.which("espeak-ng") is None:
        return "missing"
    text = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", text)
    return match.group(1) if match else text.strip()


def installed_voices() -> list[str]:
    """The voice names ``espeak-ng --voices`` accepts (language column and other languages); [] without espeak-ng."""
    if shutil.which("espeak-ng") is None:
        return []
    text = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True).stdout
    names = set()
    for line in text.splitlines()[1:]:  # below the "Pty Language Age/Gender VoiceName File Other Languages" header
        fields = line.split()
        if len(fields) >= 2:
            names.add(fields[1])
            names.update(re.findall(r"\(([^ )]+) \d+\)", line))  # "(zh-cmn 5)(zh 5)"
    return sorted(names)


def check_voices(langs) -> dict[str, str]:
    """``{lang: voice}`` for speaking ``langs`` (xx-en); ValueError for a language without an espeak-ng voice.

    When espeak-ng is installed, its voice list is checked too (builds differ); without it the build stops later,
    at synthesis, with the install command.
    """
    voices = {lang: xx_voice(lang) for lang in langs}
    installed = installed_voices()
    absent = {lang: voice for lang, voice in voices.items() if installed and voice not in installed}
    if absent:
        raise ValueError(
            f"this espeak-ng ({espeak_version()}) has no voice for "
            + ", ".join(f"{lang} ({voice!r})" for lang, voice in absent.items())
            + f"; its voices: {' '.join(installed)}"
        )
    for lang in voices:
        if lang in WEAK_VOICES:
            log(f"warning: {WEAK_VOICES[lang]}")
    return voices


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLING_RATE) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())


def synthesise(
    texts: dict[str, str],
    audio_dir: Path,
    voice: str = VOICE,
    workers: int = WORKERS,
    voices: dict[str, str] | None = None,
) -> dict[str, float]:
    """Speak every ``{clip_id: text}`` into ``audio_dir/<clip_id>.wav``; returns the durations in seconds.

    A clip is spoken with ``voices[clip_id]`` when given, else ``voice``. espeak-ng runs as a subprocess, so a
    small thread pool keeps ``workers`` of them busy.
    """
    espeak_clip = _espeak_clip()
    audio_dir.mkdir(parents=True, exist_ok=True)
    voices = voices or {}

    def one(item):
        clip_id, text = item
        # a leading '-' would be taken for an espeak-ng option (the builder's English sources never start so)
        spoken = " " + text if text.startswith("-") else text
        audio = espeak_clip(spoken, voice=voices.get(clip_id, voice))
        if len(audio) < SAMPLING_RATE // 10:
            raise RuntimeError(f"espeak-ng produced {len(audio)} samples for {text!r}")
        write_wav(audio_dir / f"{clip_id}.wav", audio)
        return clip_id, len(audio) / SAMPLING_RATE

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, sorted(texts.items())))


# ----------------------------------------------------------------------------------------------------------------
# hashes, manifest, cache
# ----------------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_hashes(folder: Path, splits=SPLITS) -> dict[str, str]:
    hashes = {f"{split}.jsonl": sha256_file(folder / f"{split}.jsonl") for split in splits}
    digest = hashlib.sha256()
    for wav in sorted((folder / "audio").iterdir(), key=lambda p: p.name):
        digest.update(f"{wav.name}\t{sha256_file(wav)}\n".encode())
    hashes["audio"] = digest.hexdigest()
    return hashes


TASKS = ("transcribe", "translate")


def requested_settings(train_sources, dev_sources, test_sources, langs, seed, direction: str = "en-xx",
                       disjoint_train: bool = False, tasks: tuple[str, ...] | None = None) -> dict:
    settings = {
        "builder_version": BUILDER_VERSION,
        "train_sources": int(train_sources),
        "dev_sources": int(dev_sources),
        "test_sources": int(test_sources),
        "langs": list(langs),
        "seed": int(seed),
        "voice": VOICE,
        "sampling_rate": SAMPLING_RATE,
        "min_words": MIN_WORDS,
        "max_words": MAX_WORDS,
    }
    if normalise_direction(direction) == "xx-en":
        # en-xx settings keep their old keys (existing builds stay valid); xx-en ones can never equal them
        del settings["voice"]
        settings.update(direction="xx-en", voices={lang: xx_voice(lang) for lang in langs})
    if disjoint_train:
        if normalise_direction(direction) != "xx-en":
            raise ValueError("disjoint_train=True needs direction='xx-en' (en-xx speaks one English clip per source)")
        # each language its own `train_sources` English sources: len(langs) x more distinct training targets
        settings["train_sources_per_language"] = "disjoint"
    if tasks is not None:
        tasks = list(dict.fromkeys(tasks))
        if normalise_direction(direction) != "xx-en" or not tasks or set(tasks) - set(TASKS):
            raise ValueError(
                f"tasks={tasks!r}: Whisper's tasks on XX speech are {list(TASKS)} (transcribe: the XX text; translate: "
                "the English); they need direction='xx-en'"
            )
        # every clip once per task, the task in the row (`task`) and in the decoder prompt: the decoder writes XX and en
        settings["tasks"] = tasks
    return settings


def is_up_to_date(out: Path, settings: dict, splits=SPLITS) -> tuple[bool, str]:
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return False, "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        return False, f"unreadable manifest ({error})"
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("settings") != settings:
        return False, "different settings"
    try:
        hashes = dataset_hashes(out, splits)
    except OSError as error:
        return False, f"missing files ({error})"
    if hashes != manifest.get("hashes"):
        return False, "hash mismatch"
    return True, "up to date"


@contextlib.contextmanager
def _locked(out: Path):
    """One builder per output folder at a time (another process waits)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------
# the builder
# ----------------------------------------------------------------------------------------------------------------


def _row(sid: str, lang: str, en: str, translation: str, direction: str) -> dict:
    """One pair in the row format of ``direction`` (xx-en: the translation is spoken, the English is the label)."""
    if direction == "xx-en":
        return {
            "id": f"{sid}-{lang}",
            "source_id": sid,
            "lang": lang,
            "en": en,
            "source_text": translation,
            "target": en,
            "audio": f"audio/{sid}-{lang}.wav",
        }
    return {
        "id": f"{sid}-{lang}",
        "source_id": sid,
        "lang": lang,
        "en": en,
        "target": translation,
        "audio": f"audio/{sid}.wav",
    }


def _task_row(row: dict, task: str) -> dict:
    """An xx-en row as one of Whisper's tasks on its clip: transcribe (the XX text) or translate (the English)."""
    target = row["source_text"] if task == "transcribe" else row["en"]
    return dict(row, id=f"{row['id']}-{task}", task=task, target=target)


def _row_format(direction: str, voices: dict[str, str] | None = None) -> dict:
    if direction == "xx-en":
        spoken = ", ".join(f"{lang} {voice!r}" for lang, voice in (voices or {}).items())
        return {
            "row": ["id", "source_id", "lang", "en", "source_text", "target", "audio"],
            "audio": f"audio/<source_id>-<lang>.wav, {SAMPLING_RATE} Hz mono 16-bit PCM, source_text spoken with "
            f"the espeak-ng voice of its language ({spoken}); target is the English",
        }
    return {
        "row": ["id", "source_id", "lang", "en", "target", "audio"],
        "audio": f"audio/<source_id>.wav, {SAMPLING_RATE} Hz mono 16-bit PCM, espeak-ng voice {VOICE!r}",
    }


def _write_dataset(folder: Path, settings: dict, debs: dict[str, Path]) -> dict:
    direction = settings.get("direction", "en-xx")
    disjoint = settings.get("train_sources_per_language") == "disjoint"
    langs = settings["langs"]
    train_total = settings["train_sources"] * (len(langs) if disjoint else 1)
    needed = train_total + settings["dev_sources"] + settings["test_sources"]
    per_lang, lang_stats, packages = {}, {}, {}
    for lang in langs:
        control = deb_control(debs[lang])
        packages[control.get("Package", package_name(lang))] = control.get("Version", "unknown")
        per_lang[lang], lang_stats[lang] = language_pairs(debs[lang], lang)
    log("candidates per language: " + ", ".join(f"{lang} {lang_stats[lang]['candidates']}" for lang in langs))
    pool, pool_info = select_pool(per_lang, needed)
    log(
        f"{pool_info['candidate_sources_any_lang']} candidate sources, "
        f"{pool_info['candidate_sources_all_langs']} with all {len(langs)} languages"
    )
    source_ids = {en: f"s{index:05d}" for index, en in enumerate(sorted(pool))}
    splits = split_sources(pool, train_total, settings["dev_sources"], settings["test_sources"], settings["seed"])
    # which languages speak each source: all of them, or (disjoint train) one language per training source
    speakers = {en: [lang for lang in langs if en in per_lang[lang]] for split in SPLITS for en in splits[split]}
    if disjoint:
        for index, en in enumerate(splits["train"]):
            speakers[en] = [langs[index % len(langs)]]

    started = time.time()
    if direction == "xx-en":
        # one clip per (source, language): the translation, in the voice of its language
        selected, voices = {}, {}
        for en in (en for split in SPLITS for en in splits[split]):
            for lang in speakers[en]:
                selected[f"{source_ids[en]}-{lang}"] = per_lang[lang][en]
                voices[f"{source_ids[en]}-{lang}"] = settings["voices"][lang]
        log(f"synthesising {len(selected)} translations ({', '.join(langs)}) with espeak-ng ({WORKERS} at a time)")
        durations = synthesise(selected, folder / "audio", voices=voices)
    else:
        selected = {source_ids[en]: en for split in SPLITS for en in splits[split]}
        log(f"synthesising {len(selected)} English sources with espeak-ng ({WORKERS} at a time)")
        durations = synthesise(selected, folder / "audio")
    log(f"speech done in {time.time() - started:.1f}s ({sum(durations.values()) / 60:.1f} min of audio)")

    counts = {}
    tasks = settings.get("tasks")
    for split in SPLITS:
        rows = []
        for en in sorted(splits[split], key=source_ids.get):
            sid = source_ids[en]
            for lang in speakers[en]:
                row = _row(sid, lang, en, per_lang[lang][en], direction)
                rows += [_task_row(row, task) for task in tasks] if tasks else [row]
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if direction == "xx-en":
            seconds = sum(durations[f"{row['source_id']}-{row['lang']}"] for row in rows)
        else:
            seconds = sum(durations[source_ids[en]] for en in splits[split])
        if tasks:  # each clip is in the split once per task: count its speech once
            seconds /= len(tasks)
        counts[split] = {
            "sources": len(splits[split]),
            "pairs": len(rows),
            "per_lang": {lang: sum(row["lang"] == lang for row in rows) for lang in langs},
            "audio_seconds": round(seconds, 2),
        }
        if tasks:
            counts[split]["per_task"] = {task: sum(row["task"] == task for row in rows) for task in tasks}

    manifest = {
        "version": MANIFEST_VERSION,
        "langs": list(langs),
        "counts": counts,
        "seed": settings["seed"],
        "settings": settings,
        "licenses": LICENSES,
        "packages": packages,
        "hashes": dataset_hashes(folder),
        "espeak_ng_version": espeak_version(),
        "stats": {"per_lang": lang_stats, **pool_info},
        "format": {"splits": [f"{split}.jsonl" for split in SPLITS], **_row_format(direction, settings.get("voices"))},
    }
    if tasks:
        manifest["format"]["row"].append("task")
        manifest["format"]["task"] = "transcribe: target is source_text (XX); translate: target is en; one clip, both rows"
    if direction == "xx-en":
        manifest = {"version": MANIFEST_VERSION, "direction": direction, **manifest}  # en-xx manifests: unchanged
    return manifest


def _publish(out: Path, make) -> dict:
    """Fill a hidden sibling of ``out`` with ``make(work) -> manifest``, write the manifest, rename it into place.

    The caller holds ``out``'s lock. Whatever fails, ``out`` is either the old folder or the new one, complete.
    """
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    work.mkdir()
    try:
        manifest = make(work)
        # the manifest is written last: a folder without one is never taken for a finished dataset
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
        os.rename(work, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def build(
    out_dir: str | os.PathLike | None = None,
    train_sources: int = 300,
    dev_sources: int = 40,
    test_sources: int = 60,
    langs=None,
    seed: int = 0,
    debs_dir: str | os.PathLike | None = None,
    direction: str = "en-xx",
    disjoint_train: bool = False,
    tasks: tuple[str, ...] | None = None,
) -> Path:
    """Build (or verify the cached) dataset in ``out_dir`` and return its path.

    ``direction`` is ``"en-xx"`` (English speech -> XX text) or ``"xx-en"`` (XX speech -> English text); the
    defaults of ``out_dir`` and ``langs`` follow it (``DEFAULT_OUT``/``LANGS``, ``XX_EN_OUT``/``XX_EN_LANGS``).
    With ``disjoint_train`` (xx-en only), every language gets its own ``train_sources`` training sources, so the
    training set holds ``len(langs)`` times more distinct English targets for the same number of clips; dev and test
    stay shared by every language (paired per-language comparisons). With ``tasks`` (xx-en only, e.g.
    ``("transcribe", "translate")``) every clip is in its split once per task, with a ``task`` field: the decoder
    then writes every spoken language and English.
    """
    direction = normalise_direction(direction)
    xx_en = direction == "xx-en"
    out = Path(out_dir if out_dir is not None else XX_EN_OUT if xx_en else DEFAULT_OUT).resolve()
    langs = list(dict.fromkeys(normalise_lang(lang) for lang in (langs or (XX_EN_LANGS if xx_en else LANGS))))
    if min(train_sources, dev_sources, test_sources) < 0 or train_sources + dev_sources + test_sources == 0:
        raise ValueError("source counts must be >= 0 and not all zero")
    if xx_en:
        check_voices(langs)  # before any download
    settings = requested_settings(train_sources, dev_sources, test_sources, langs, seed, direction, disjoint_train, tasks)
    with _locked(out):
        fresh, reason = is_up_to_date(out, settings)
        if fresh:
            log(f"{out} is up to date (same settings, hashes verified): nothing to do")
            return out
        if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a dataset built by this tool; remove it or pick --out")
        log(f"building {out} ({direction}, {reason})")
        started = time.time()
        debs = fetch_debs(langs, debs_dir)

        def make(work: Path) -> dict:
            manifest = _write_dataset(work, settings, debs)
            manifest["build_seconds"] = round(time.time() - started, 1)
            return manifest

        counts = _publish(out, make)["counts"]
        log(
            f"wrote {out} in {time.time() - started:.1f}s: "
            + ", ".join(f"{name} {counts[name]['sources']} sources / {counts[name]['pairs']} pairs" for name in SPLITS)
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# a user's own pairs (the benchmark's --test-pairs)
# ----------------------------------------------------------------------------------------------------------------

PAIR_FIELDS = {"en-xx": ("lang", "en", "target"), "xx-en": ("lang", "en", "source_text", "target")}
# a source id names audio files, so it is kept to a safe file-name alphabet
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def read_pairs(pairs_file: str | os.PathLike, direction: str = "xx-en") -> list[dict]:
    """A user's jsonl of pairs, checked and completed into the builder's row format of ``direction``.

    Each line is an object with ``lang``, ``en`` and ``target`` (xx-en: also ``source_text``, the text that is
    spoken), non-empty strings; ``id`` (default ``<source_id>-<lang>``) and ``source_id`` (default: one ``sNNNNN``
    per distinct English sentence) are optional. Blank lines are skipped; other fields are dropped. A bad line is
    refused with a ValueError naming the file, its line number and the field.
    """
    direction = normalise_direction(direction)
    path = Path(pairs_file)
    required = PAIR_FIELDS[direction]
    parsed = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in required:
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r} (a {direction} pair needs {', '.join(required)})")
            if not isinstance(row[field], str) or not row[field].strip():
                raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {row[field]!r}")
        lang = row["lang"].strip().lower().replace("_", "-")
        if direction == "xx-en" and lang not in XX_VOICES:
            raise ValueError(
                f"{where}: field 'lang': espeak-ng has no voice for {lang!r}; languages with a voice: "
                + ", ".join(f"{code} ({voice})" for code, voice in XX_VOICES.items())
            )
        if "id" in row and not (isinstance(row["id"], str) and row["id"].strip()):
            raise ValueError(f"{where}: field 'id' must be a non-empty string, got {row['id']!r}")
        if "source_id" in row and not (isinstance(row["source_id"], str) and SAFE_ID.fullmatch(row["source_id"])):
            raise ValueError(
                f"{where}: field 'source_id' names the audio file: 1-100 letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit; got {row['source_id']!r}"
            )
        parsed.append((number, where, lang, row))
    if not parsed:
        raise ValueError(f"{path}: no pairs (an empty file)")

    # generated source ids: one per distinct English sentence, avoiding the ids the file gives
    taken = {row["source_id"] for _, _, _, row in parsed if "source_id" in row}
    generated, counter = {}, 0
    for _, _, _, row in parsed:
        if "source_id" not in row and row["en"] not in generated:
            while f"s{counter:05d}" in taken:
                counter += 1
            generated[row["en"]] = f"s{counter:05d}"
            taken.add(generated[row["en"]])

    rows, ids, clips = [], {}, {}
    for number, where, lang, row in parsed:
        sid = row.get("source_id") or generated[row["en"]]
        out = {"id": row.get("id") or f"{sid}-{lang}", "source_id": sid, "lang": lang, "en": row["en"]}
        if direction == "xx-en":
            out["source_text"] = row["source_text"]
            clip, spoken = f"{sid}-{lang}", row["source_text"]
        else:
            clip, spoken = sid, row["en"]
        out.update(target=row["target"], audio=f"audio/{clip}.wav")
        if out["id"] in ids:
            raise ValueError(f"{where}: id {out['id']!r} is already used on line {ids[out['id']]}")
        ids[out["id"]] = number
        # one clip per source (en-xx) or per source and language (xx-en): it must say one thing
        if clip in clips and clips[clip][1] != spoken:
            field = "source_text" if direction == "xx-en" else "en"
            raise ValueError(
                f"{where}: field {field!r} differs from line {clips[clip][0]}, which has the same clip {clip!r} "
                f"(give the rows different source_id values)"
            )
        clips.setdefault(clip, (number, spoken))
        rows.append(out)
    return rows


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def synthesise_pairs(
    pairs_file: str | os.PathLike, out_dir: str | os.PathLike, direction: str = "xx-en", workers: int = WORKERS
) -> Path:
    """Speak a user's jsonl of pairs (see ``read_pairs``) into ``<out_dir>/test.jsonl`` + ``<out_dir>/audio/``.

    xx-en speaks each row's ``source_text`` with its language's voice into ``audio/<source_id>-<lang>.wav``;
    en-xx speaks each source's ``en`` with the English voice into ``audio/<source_id>.wav``. The folder is built
    in a hidden sibling and renamed into place (with a ``manifest.json``); bad rows are refused before anything
    is written, and a folder already made from the same file and settings (hashes verified) is left alone.
    Returns the folder.
    """
    direction = normalise_direction(direction)
    source = Path(pairs_file)
    out = Path(out_dir).resolve()
    rows = read_pairs(source, direction)
    langs = list(dict.fromkeys(row["lang"] for row in rows))
    settings = {
        "builder_version": BUILDER_VERSION,
        "direction": direction,
        "pairs_sha256": sha256_file(source),
        "sampling_rate": SAMPLING_RATE,
    }
    if direction == "xx-en":
        settings["voices"] = check_voices(langs)
    else:
        settings["voice"] = VOICE
    if shutil.which("espeak-ng") is None:
        raise MissingPackagesError("espeak-ng is not installed: apt-get update && apt-get install -y espeak-ng")
    with _locked(out):
        fresh, reason = is_up_to_date(out, settings, splits=("test",))
        if fresh:
            log(f"{out} is up to date (same pairs file and settings, hashes verified): nothing to do")
            return out
        if out.exists() and any(out.iterdir()) and "pairs_file" not in _read_manifest(out):
            # never replace a built train/dev/test dataset (or anything else) with a test-only folder
            raise FileExistsError(f"{out} exists and is not a folder of spoken pairs; remove it or pick another")
        log(f"speaking {len(rows)} pairs from {source} into {out} ({direction}, {reason})")
        started = time.time()

        def make(work: Path) -> dict:
            texts, voices = {}, {}
            for row in rows:
                clip = Path(row["audio"]).stem
                texts[clip] = _clean(row["source_text"] if direction == "xx-en" else row["en"])
                voices[clip] = settings["voices"][row["lang"]] if direction == "xx-en" else VOICE
            durations = synthesise(texts, work / "audio", workers=workers, voices=voices)
            with open(work / "test.jsonl", "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            return {
                "version": MANIFEST_VERSION,
                "direction": direction,
                "langs": langs,
                "pairs_file": str(source.resolve()),
                "counts": {
                    "test": {
                        "sources": len({row["source_id"] for row in rows}),
                        "pairs": len(rows),
                        "per_lang": {lang: sum(row["lang"] == lang for row in rows) for lang in langs},
                        "audio_seconds": round(sum(durations.values()), 2),
                    }
                },
                "settings": settings,
                "licenses": {"text": f"as for {source.name} (user-supplied)", "speech": LICENSES["speech"]},
                "hashes": dataset_hashes(work, splits=("test",)),
                "espeak_ng_version": espeak_version(),
                "build_seconds": round(time.time() - started, 1),
                "format": {"splits": ["test.jsonl"], **_row_format(direction, settings.get("voices"))},
            }

        _publish(out, make)
        log(f"wrote {out} in {time.time() - started:.1f}s: {len(rows)} pairs")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data.build", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {DEFAULT_OUT}; --tiny: {TINY_OUT}; xx-en: {XX_EN_OUT}, {TINY_XX_EN_OUT})",
    )
    parser.add_argument("--train-sources", type=int, default=None, help="English sources in train (default 300)")
    parser.add_argument("--dev-sources", type=int, default=None, help="English sources in dev (default 40)")
    parser.add_argument("--test-sources", type=int, default=None, help="English sources in test (default 60)")
    parser.add_argument(
        "--langs",
        default=None,
        help=f"comma-separated XX languages (default {','.join(LANGS)}; xx-en: all but mn, which has no voice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--debs",
        type=Path,
        default=None,
        help=f"folder of .deb files and download cache (default {default_debs_dir()})",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny preset: 3 languages (xx-en: de, sv), 4/2/2 sources (seconds)"
    )
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="en-xx",
        help="en-xx: English speech -> XX text (default); xx-en: XX speech (one clip per pair) -> English text",
    )
    parser.add_argument(
        "--disjoint-train",
        action="store_true",
        help="xx-en: each language its own --train-sources training sources (more distinct targets per clip)",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="xx-en: comma-separated Whisper tasks per clip, e.g. transcribe,translate (each clip once per task)",
    )
    parser.add_argument(
        "--pairs",
        type=Path,
        default=None,
        help="instead of building: speak this jsonl of pairs (row format) into --out (test.jsonl + audio/)",
    )
    args = parser.parse_args(argv)

    if args.pairs is not None:
        if args.out is None:
            parser.error("--pairs needs --out")
        try:
            path = synthesise_pairs(args.pairs, args.out, args.direction)
        except (MissingPackagesError, ValueError, FileExistsError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(path)
        return 0

    xx_en = args.direction == "xx-en"
    if args.tiny:
        preset = dict(TINY_XX_EN) if xx_en else dict(TINY)
    else:
        preset = dict(train_sources=300, dev_sources=40, test_sources=60, langs=XX_EN_LANGS if xx_en else LANGS)
    preset["direction"] = args.direction
    preset["disjoint_train"] = args.disjoint_train
    if args.tasks:
        preset["tasks"] = tuple(task.strip() for task in args.tasks.split(",") if task.strip())
    for key in ("train_sources", "dev_sources", "test_sources"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.langs:
        preset["langs"] = [lang for lang in args.langs.split(",") if lang.strip()]
    out = args.out or ((TINY_XX_EN_OUT if xx_en else TINY_OUT) if args.tiny else (XX_EN_OUT if xx_en else DEFAULT_OUT))
    try:
        path = build(out, seed=args.seed, debs_dir=args.debs, **preset)
    except (MissingPackagesError, ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
