#!/usr/bin/env python3
"""Build the example corpus (corpus.txt) and a byte-level BPE tokenizer
(tokenizer.json) for Gantry's examples.

The corpus is assembled from freely redistributable English text that ships
with a Debian system:

  1. the license texts in /usr/share/common-licenses (GPL, LGPL, GFDL, MPL,
     Apache, Artistic, BSD, CC0), each included once even where symlinked;
  2. the CPython license (LICENSE.txt of the running interpreter's stdlib, or
     /usr/lib/python3*/LICENSE.txt);
  3. paragraphs of /usr/share/doc/*/copyright files (sorted by package name,
     de-duplicated paragraph by paragraph, mostly-prose paragraphs only) until
     the corpus reaches TARGET_BYTES (at most PER_FILE_BYTES from each file).

Text is normalized to NFC UTF-8 with '\n' line endings, no form feeds or tabs,
no trailing spaces, and at most one blank line in a row. Documents are
separated by one blank line. The result only depends on the files present on
the machine, so re-running it on the same machine reproduces it exactly.

The tokenizer is a byte-level BPE (GPT-2 style) trained on corpus.txt with the
Hugging Face `tokenizers` library: vocab_size 512, ByteLevel pre-tokenizer
(add_prefix_space=False), ByteLevel decoder, and a single special token
"<|endoftext|>".

Usage:  python3 examples/data/make_corpus.py
"""

import glob
import hashlib
import os
import re
import sys
import sysconfig
import unicodedata

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus.txt")
TOKENIZER = os.path.join(HERE, "tokenizer.json")

TARGET_BYTES = 600_000  # stop adding copyright paragraphs past this size
PER_FILE_BYTES = 8_000  # at most this much text from any one copyright file
VOCAB_SIZE = 512
SPECIAL = "<|endoftext|>"


def normalize(text):
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\f", "\n").replace("\t", "    ")
    # drop other control characters (keep newlines)
    text = "".join(
        c
        for c in text
        if c == "\n" or (unicodedata.category(c)[0] != "C" and c != "\ufffd")
    )
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def read_text(path):
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def paragraph_key(p):
    return hashlib.sha1(" ".join(p.split()).lower().encode()).hexdigest()


def is_prose(p):
    """Mostly letters and spaces, a few words long."""
    if len(p) < 40:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in p)
    if letters / len(p) < 0.85:
        return False
    return len(p.split()) >= 8


def license_sources():
    seen = set()
    out = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        out.append(real)
    py = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    cands = [py] + sorted(glob.glob("/usr/lib/python3*/LICENSE.txt"))
    for c in cands:
        if os.path.isfile(c):
            out.append(c)
            break
    return out


def build_corpus():
    docs = []
    seen_paras = set()
    total = 0

    def add_doc(text):
        nonlocal total
        docs.append(text)
        total += len(text.encode("utf-8")) + 2

    sources = license_sources()
    if not sources:
        sys.exit("no /usr/share/common-licenses found (needs a Debian-like system)")
    for path in sources:
        text = read_text(path)
        if text is None:
            continue
        text = normalize(text)
        for p in text.split("\n\n"):
            seen_paras.add(paragraph_key(p))
        add_doc(text)
    n_license_docs = len(docs)

    n_copyright = 0
    for path in sorted(glob.glob("/usr/share/doc/*/copyright")):
        if total >= TARGET_BYTES:
            break
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        text = read_text(path)
        if text is None:
            continue
        keep = []
        kept_bytes = 0
        for p in normalize(text).split("\n\n"):
            if kept_bytes >= PER_FILE_BYTES:
                break
            # de-indent Debian copyright continuation lines (" text", " .")
            p = "\n".join(
                "" if ln.strip() == "." else ln.strip() for ln in p.split("\n")
            ).strip("\n")
            p = re.sub(r"\n{2,}", "\n", p)
            if not is_prose(p):
                continue
            k = paragraph_key(p)
            if k in seen_paras:
                continue
            seen_paras.add(k)
            keep.append(p)
            kept_bytes += len(p.encode("utf-8")) + 2
        if keep:
            add_doc("\n\n".join(keep))
            n_copyright += 1

    corpus = "\n\n".join(docs) + "\n"
    with open(CORPUS, "w", encoding="utf-8", newline="\n") as f:
        f.write(corpus)
    print(
        f"corpus.txt: {len(corpus.encode('utf-8'))} bytes, {len(corpus)} chars, "
        f"{n_license_docs} license texts + {n_copyright} copyright files"
    )
    return corpus


def train_tokenizer(corpus):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([CORPUS], trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(TOKENIZER, pretty=True)

    # round trip checks
    tok = Tokenizer.from_file(TOKENIZER)
    samples = [
        "Hello, world! This is Gantry's example corpus.\n",
        "  Leading spaces, tabs\tand ünïcödé — “quotes” 日本語 🙂\n\n",
        corpus[:2000],
    ]
    for s in samples:
        ids = tok.encode(s).ids
        back = tok.decode(ids)
        assert back == s, (s[:80], back[:80])
    enc = tok.encode(corpus)
    assert tok.decode(enc.ids) == corpus, "corpus round trip failed"
    eot = tok.token_to_id(SPECIAL)
    n_bytes = len(corpus.encode("utf-8"))
    print(
        f"tokenizer.json: vocab {tok.get_vocab_size()}, {SPECIAL} id {eot}; "
        f"round trip OK"
    )
    print(
        f"corpus encodes to {len(enc.ids)} tokens "
        f"({n_bytes / len(enc.ids):.3f} bytes/token)"
    )
    print("sample:", tok.encode(samples[0]).tokens)


def main():
    corpus = build_corpus()
    train_tokenizer(corpus)


if __name__ == "__main__":
    main()
