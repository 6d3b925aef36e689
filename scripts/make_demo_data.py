"""Rebuild spri_hf/data/libreoffice_en_xx.jsonl: En->XX sentence pairs from Debian's LibreOffice catalogs.

Usage (Debian/Ubuntu, as root or with sudo):
    apt-get update && apt-get download libreoffice-l10n-de libreoffice-l10n-ca libreoffice-l10n-sv libreoffice-l10n-id
    for f in libreoffice-l10n-*.deb; do dpkg -x "$f" root/; done
    python scripts/make_demo_data.py root/ spri_hf/data/libreoffice_en_xx.jsonl --per-language 60

The catalogs are MPL-2.0 (see spri_hf/data/LICENSE-DATA.md). Deterministic: same packages, same output.
"""

import argparse
import gettext
import glob
import hashlib
import json
import os
import re


# Format placeholders, markup, accelerators, escapes: not sentence-like text.
_REJECT = re.compile(r"[%$~_&<>{}\[\]\\|#@=]|\(&\w\)|\.\.\.|http")


def sentence_like(source: str, target: str) -> bool:
    if source == target or "\n" in source or "\n" in target:
        return False
    if _REJECT.search(source) or _REJECT.search(target):
        return False
    words = source.split()
    return 5 <= len(words) <= 16 and source[0].isupper() and source.endswith(".")


def catalog_pairs(root: str, lang: str) -> dict[str, str]:
    pairs = {}
    pattern = os.path.join(root, "usr/lib/libreoffice/program/resource", lang, "LC_MESSAGES", "*.mo")
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as handle:
            catalog = gettext.GNUTranslations(handle)
        for source, target in catalog._catalog.items():
            if isinstance(source, tuple):  # plural forms
                continue
            source = source.split("\x04")[-1]  # drop the msgctxt
            if source and sentence_like(source, target):
                pairs.setdefault(source, target)
    return pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--languages", default="de,ca,sv,id")
    parser.add_argument("--per-language", type=int, default=60)
    args = parser.parse_args()
    rows = []
    for lang in args.languages.split(","):
        pairs = catalog_pairs(args.root, lang)
        # a stable, content-based order: the same packages always give the same sample
        chosen = sorted(pairs, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[: args.per_language]
        rows += [{"lang": lang, "en": source, "xx": pairs[source]} for source in chosen]
        print(f"{lang}: {len(pairs)} sentence-like pairs, kept {len(chosen)}")
    with open(args.out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
