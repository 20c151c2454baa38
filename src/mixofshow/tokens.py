"""Concept words and their layer-wise tokens: naming, initialisers, registration, and binding prompts to layers."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import MixOfShowError

RANDOM_INIT = re.compile(r"^<rand-([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)>$")
ANGLE_WORD = re.compile(r"<[^<>\s|]+>")


def split_words(spec: str) -> tuple[str, ...]:
    """Split a `"<hina1>+<hina2>"` specification (also accepts spaces) into words."""
    words = tuple(w for w in re.split(r"[+\s]+", spec.strip()) if w)
    if not words:
        raise MixOfShowError(f"no concept words in {spec!r}: give them like '<hina1>+<hina2>'")
    if len(set(words)) != len(words):
        raise MixOfShowError(f"concept words {spec!r} repeat a word: each word must be distinct")
    return words


def layer_token_name(word: str, layer: int) -> str:
    """The tokenizer entry of `word` at cross-attention layer `layer`: `<hina1>` -> `<hina1_3>`."""
    return f"<{word.strip('<>')}_{layer}>"


def word_pattern(word: str) -> re.Pattern:
    """Matches `word` in a prompt: `<hina1>` anywhere (it delimits itself, as in `<hina1>'s`), a plain word
    like `sks` only as a whole word."""
    before = r"(?<![\w<])" if re.match(r"\w", word) else ""
    after = r"(?![\w>])" if re.search(r"\w$", word) else ""
    return re.compile(before + re.escape(word) + after)


def initial_embedding(init: str, tokenizer, embedding_table: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One embedding row from an initialiser: `<rand-0.013>` (N(0, 0.013^2) per element) or a one-token class word.

    Args:
        init: the initialiser.
        tokenizer: the base tokenizer.
        embedding_table: the text encoder's token embedding matrix `(V, D)`.
        generator: the random source for `<rand-…>`.

    Returns:
        A `(D,)` float32 tensor.
    """
    match = RANDOM_INIT.match(init)
    hidden = embedding_table.shape[1]
    if match:
        return torch.randn(hidden, generator=generator) * float(match.group(1))
    ids = tokenizer(init, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise MixOfShowError(
            f"initialiser {init!r} is {len(ids)} tokens {pieces}, not one: use a single-token class word "
            f"(e.g. 'girl', 'dog') or '<rand-0.013>'"
        )
    return embedding_table[ids[0]].detach().float().cpu().clone()


def check_new_words(tokenizer, words: tuple[str, ...], num_layers: int) -> None:
    """Raise if a word (or one of its layer-wise tokens) already means something to the tokenizer."""
    def known(token: str) -> bool:  # (`get_vocab()` would copy the whole vocabulary on every call)
        return token == tokenizer.unk_token or tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id

    for word in words:
        if any(c.isspace() for c in word) or not word:
            raise MixOfShowError(f"concept word {word!r} must be one word without spaces, like '<hina1>'")
        ids = tokenizer(word, add_special_tokens=False).input_ids
        taken = [layer_token_name(word, k) for k in range(num_layers) if known(layer_token_name(word, k))]
        if known(word) or known(f"{word}</w>") or len(ids) == 1 or taken:
            raise MixOfShowError(
                f"concept word {word!r} already exists in the tokenizer{' as ' + taken[0] if taken else ''}: "
                f"pick a new word, e.g. '<{word.strip('<>')}1>'"
            )


@dataclass(frozen=True)
class ConceptToken:
    """A concept word registered in a tokenizer: its token id at every cross-attention layer."""

    word: str
    layer_ids: tuple[int, ...]  # length = number of layers (one repeated id for a non-layer-wise word)

    @property
    def layerwise(self) -> bool:
        return len(set(self.layer_ids)) > 1


class ConceptVocabulary:
    """The concept words a tokenizer/text encoder pair knows, and how a prompt is bound to per-layer token ids."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.tokens: dict[str, ConceptToken] = {}

    def __contains__(self, word: str) -> bool:
        return word in self.tokens

    def words(self) -> list[str]:
        return list(self.tokens)

    def add(self, tokenizer, text_encoder, word: str, rows: torch.Tensor) -> ConceptToken:
        """Add a word with its embedding rows to the tokenizer and text encoder.

        Args:
            tokenizer: the tokenizer, extended in place.
            text_encoder: the text encoder, its token embedding resized and written in place.
            word: the concept word, e.g. `<hina1>`.
            rows: `(num_layers, D)` layer-wise embeddings, or `(1, D)` for a word shared by all layers.

        Returns:
            The registered `ConceptToken`.
        """
        self.check(tokenizer, text_encoder, word, rows)
        names = [layer_token_name(word, k) for k in range(rows.shape[0])]
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[ids] = rows.to(table.device, table.dtype)
        layer_ids = tuple(ids) if len(ids) > 1 else tuple(ids) * self.num_layers
        self.tokens[word] = ConceptToken(word, layer_ids)
        return self.tokens[word]

    def check(self, tokenizer, text_encoder, word: str, rows: torch.Tensor) -> None:
        """Raise, changing nothing, if `add` would refuse this word and these rows."""
        if rows.shape[0] not in (1, self.num_layers):
            raise MixOfShowError(
                f"concept word {word!r} has {rows.shape[0]} layer-wise embeddings but this model has "
                f"{self.num_layers} cross-attention layers: the concept was trained on another base model"
            )
        hidden = text_encoder.get_input_embeddings().weight.shape[1]
        if rows.shape[1] != hidden:
            raise MixOfShowError(
                f"concept word {word!r} has embeddings of size {rows.shape[1]} but the text encoder's hidden size is "
                f"{hidden}: the concept was trained on another base model"
            )
        check_new_words(tokenizer, (word,), self.num_layers)

    def check_prompt(self, prompt: str) -> None:
        """Raise if the prompt uses an `<angle-bracket>` word that is not a known concept."""
        unknown = [w for w in ANGLE_WORD.findall(prompt) if w not in self.tokens and not w.startswith("<|")]
        if unknown:
            known = ", ".join(self.tokens) or "none loaded"
            raise MixOfShowError(
                f"prompt {prompt!r} uses concept word(s) {unknown} that the model does not know (known: {known}): "
                "load the concept file that defines them or fix the spelling"
            )

    def bind(self, prompt: str) -> str:
        """The prompt with each concept word replaced by its layer-0 token name (what the tokenizer sees)."""
        self.check_prompt(prompt)
        for token in self.tokens.values():
            name = layer_token_name(token.word, 0)
            prompt = word_pattern(token.word).sub(name, prompt)
        return prompt

    def layer_input_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        """Tokenize prompts once per cross-attention layer.

        Args:
            tokenizer: the tokenizer the concepts were added to.
            prompts: B prompts that may use concept words.

        Returns:
            `(L, B, T)` token ids, layer k holding each concept word's layer-k token; L is 1 when no prompt
            uses a layer-wise word (every layer then reads the same encoding).
        """
        ids = tokenizer(
            [self.bind(p) for p in prompts],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        used = [t for t in self.tokens.values() if t.layerwise and (ids == t.layer_ids[0]).any()]
        if not used:
            return ids[None]
        layers = ids[None].repeat(self.num_layers, 1, 1)
        for token in used:
            first = ids == token.layer_ids[0]
            for k, token_id in enumerate(token.layer_ids):
                layers[k][first] = token_id
        return layers

    def to_json(self, tokenizer) -> dict:
        """`{word: [token name per layer]}` for a model folder's concepts.json."""
        return {w: tokenizer.convert_ids_to_tokens(list(t.layer_ids)) for w, t in self.tokens.items()}

    @classmethod
    def from_json(cls, data: dict, tokenizer, num_layers: int) -> ConceptVocabulary:
        vocabulary = cls(num_layers)
        for word, names in data.items():
            ids = tokenizer.convert_tokens_to_ids(names)
            if len(ids) != num_layers or tokenizer.unk_token_id in ids:
                raise MixOfShowError(f"concepts.json entry {word!r} does not match this model's tokenizer and UNet")
            vocabulary.tokens[word] = ConceptToken(word, tuple(ids))
        return vocabulary


def encode_layerwise(text_encoder, layer_ids: torch.Tensor) -> torch.Tensor:
    """Encode `(L, B, T)` token ids in one text-encoder batch; returns `(L, B, T, D)` hidden states."""
    layers, batch, length = layer_ids.shape
    hidden = text_encoder(layer_ids.reshape(layers * batch, length).to(text_encoder.device))[0]
    return hidden.view(layers, batch, length, -1)
