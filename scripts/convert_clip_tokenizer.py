"""Convert CLIP's gzipped BPE merges file into a Hugging Face ``CLIPTokenizer`` folder.

The input is ``bpe_simple_vocab_16e6.txt.gz`` as shipped by OpenAI CLIP and by
open_clip (MIT license). Get it without installing open_clip::

    .venv/bin/pip download --no-deps -d /tmp/oc open_clip_torch
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc

Then run::

    .venv/bin/python scripts/convert_clip_tokenizer.py \\
        /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz src/mixofshow/assets/clip_tokenizer

The vocabulary is built in the order of CLIP's ``SimpleTokenizer``: the 256
byte-to-unicode characters, the same 256 with ``</w>`` appended, one entry per
merge (lines 1 .. 48894 of the file; line 0 is a header), then the two special
tokens under their Hugging Face names ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407): 49408 ids in all. The output folder gets
``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (model_max_length 77
and the special tokens; without it ``from_pretrained`` leaves model_max_length
unset) and a ``LICENSE`` with the MIT notices of OpenAI CLIP and open_clip. The script writes deterministic
bytes, so rerunning it on the same input changes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48894, as 49152-256-2 in CLIP's SimpleTokenizer
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

LICENSE_TEXT = """\
The files vocab.json and merges.txt in this folder are derived from
bpe_simple_vocab_16e6.txt.gz, the byte-pair-encoding vocabulary of OpenAI CLIP
(https://github.com/openai/CLIP), as redistributed by open_clip
(https://github.com/mlfoundations/open_clip, package open_clip_torch).
Both projects are released under the MIT License:

Copyright (c) 2021 OpenAI

Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman,
Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar,
John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi,
Ludwig Schmidt

Permission is hereby granted, free of charge, to any person obtaining
a copy of this software and associated documentation files (the
"Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to
the following conditions:

The above copyright notice and this permission notice shall be
included in all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND,
EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE
LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION
OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION
WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def bytes_to_unicode() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for bytes 0..255, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    """The first 48894 merges of the file, skipping its header line, each a pair of symbols."""
    with gzip.open(bpe_gz, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    selected = lines[1 : N_MERGES + 1]
    merges = []
    for number, line in enumerate(selected, start=1):
        parts = line.split()
        if len(parts) != 2:
            raise SystemExit(f"{bpe_gz}: line {number} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != N_MERGES:
        raise SystemExit(f"{bpe_gz}: expected {N_MERGES} merges after the header, found {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in SimpleTokenizer's order; fails if any token would appear twice."""
    base = bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise SystemExit(f"expected {VOCAB_SIZE} distinct tokens, built {len(vocab)} of {len(tokens)}")
    return vocab


def write_folder(vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: Path) -> None:
    """Write the tokenizer files and the LICENSE into out_dir (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    # Needed: without it from_pretrained leaves model_max_length at a huge sentinel
    # (int(1e30)). transformers 5 reads special_tokens_map.json only as a legacy
    # fallback, so the special tokens are spelled out here instead.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "LICENSE").write_text(LICENSE_TEXT, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path, help="folder to write the tokenizer files into")
    args = parser.parse_args(argv)
    merges = read_merges(args.bpe_gz)
    vocab = build_vocab(merges)
    write_folder(vocab, merges, args.out_dir)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out_dir}")


if __name__ == "__main__":
    main()
