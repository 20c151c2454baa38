"""The CLIP text tokenizer shipped inside the package (converted from open_clip's MIT-licensed BPE vocabulary)."""

from __future__ import annotations

from importlib import resources

from transformers import CLIPTokenizer

_ASSET_PACKAGE = "mixofshow"


def load_clip_tokenizer() -> CLIPTokenizer:
    """Load the shipped CLIP BPE tokenizer: 49408 ids, bos 49406, eos/pad/unk 49407, model_max_length 77.

    Reads only the package's own files (vocab.json, merges.txt, tokenizer_config.json);
    nothing is downloaded. Each call returns a fresh tokenizer, so adding tokens to one
    does not change another.
    """
    # One name per "/" step: a namespace package's MultiplexedPath.joinpath takes a single name on 3.11.
    folder = resources.files(_ASSET_PACKAGE) / "assets" / "clip_tokenizer"
    with resources.as_file(folder) as path:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
