"""The joint vocabulary: text ids (a byte-level BPE + the dolly-v2 specials), then image-code ids.

Layout of the embedding rows (GPT-NeoX-20B tokenizer, 1,024 codes):

    [0, n_text)                     text ids; 0 `<|endoftext|>`, 1 `<|padding|>`, ...,
                                    50277 `### End`, 50278 `### Instruction:`, 50279 `### Response:\\n`
    [n_text, n_text + n_image)      image code c has id n_text + c
    [n_text + n_image, embed_rows)  padding rows (embed_rows is a multiple of 128); never sampled

`Vocab` wraps a `tokenizers.Tokenizer` (the Rust fast tokenizer, no transformers needed at run
time; `Vocab.to_transformers()` gives a `PreTrainedTokenizerFast` for HF export).

An image enters a prompt as the text placeholder `<image>`, which `ids_with_image` replaces with the
image's ids. LLM-CXR itself keeps the `<` and `>` tokens around the codes (it splices the codes in
place of the `image` token only); `Vocab(image_brackets=True)` reproduces that layout exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer

from llmcxr_jax import configs
from llmcxr_jax.io_utils import atomic_write_text

END_KEY = "### End"
INSTRUCTION_KEY = "### Instruction:"
RESPONSE_KEY = "### Response:"  # Dolly's name for the key without its newline
RESPONSE_KEY_NL = "### Response:\n"  # the special token: the key *with* its newline
DOLLY_SPECIALS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)  # dolly-v2's order: ids n, n+1, n+2

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
IMAGE_PLACEHOLDER = "<image>"  # LLM-CXR's CXR_VQ_VQ_REPLACE_TEMPLATE
TOKENIZER_FILE = "tokenizer.json"
VOCAB_META_FILE = "llmcxr_vocab.json"  # not "vocab.json": HF tokenizer dirs use that name already
DEFAULT_IMAGE_CODES = configs.IMAGE_CODES


def _as_int_array(values: Any, what: str) -> np.ndarray:
    """A 1-D integer array from a list/array of ints; a clear error for anything else."""
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A text tokenizer with the Dolly specials, followed by `n_image` image-code ids."""

    tokenizer: Tokenizer = dataclasses.field(repr=False)
    n_text: int
    n_image: int = DEFAULT_IMAGE_CODES
    image_brackets: bool = False  # True: LLM-CXR's `<` codes `>` layout (see module docstring)

    def __post_init__(self) -> None:
        size = text_size(self.tokenizer)
        if self.n_text != size:
            raise ValueError(f"n_text={self.n_text} but the tokenizer has {size} ids")
        if self.n_image <= 0:
            raise ValueError(f"n_image must be positive, got {self.n_image}")
        missing = [t for t in DOLLY_SPECIALS + (EOS_TOKEN,) if self.tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}; build the Vocab with load_vocab()")

    # ---- layout --------------------------------------------------------------------------------

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        return self.n_text

    @property
    def n_valid(self) -> int:
        """Text + image ids: every id a model may emit."""
        return self.n_text + self.n_image

    @property
    def embed_rows(self) -> int:
        """Embedding / output rows: text + image ids padded to a multiple of 128."""
        return configs.extended_vocab_rows(self.n_text, self.n_image)

    def _id(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return idx

    @property
    def end_id(self) -> int:
        return self._id(END_KEY)

    @property
    def instruction_id(self) -> int:
        return self._id(INSTRUCTION_KEY)

    @property
    def response_id(self) -> int:
        return self._id(RESPONSE_KEY_NL)

    @property
    def eos_id(self) -> int:
        return self._id(EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        """`<|padding|>` where the tokenizer has it (GPT-NeoX: 1), else `<|endoftext|>`."""
        idx = self.tokenizer.token_to_id(PAD_TOKEN)
        return self.eos_id if idx is None else idx

    # ---- text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. Dolly keys in the text become their special ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust tokenizer)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_image: bool = True,
               skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Padding rows are always dropped; image ids are dropped, or with
        `skip_image=False` each run of image ids is shown as `IMAGE_PLACEHOLDER`."""
        if not hasattr(ids, "__array__") and not isinstance(ids, (list, tuple)):
            ids = list(ids)
        arr = _as_int_array(ids, "ids")
        if arr.size and arr.min() < 0:
            pos = int(np.argmax(arr < 0))
            raise ValueError(f"negative token id {int(arr[pos])} at position {pos}")
        pieces: list[str] = []
        run: list[int] = []
        in_image = False
        for idx in arr.tolist():
            if idx >= self.n_valid:
                continue
            if idx >= self.n_text:
                if not in_image:
                    pieces.append(self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens))
                    run = []
                    if not skip_image:
                        pieces.append(IMAGE_PLACEHOLDER)
                    in_image = True
                continue
            in_image = False
            run.append(idx)
        pieces.append(self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(pieces)

    # ---- image ids -----------------------------------------------------------------------------

    def image_ids(self, codes: Any, expected: int | None = None) -> np.ndarray:
        """Token ids (int32) of VQ-GAN codes in [0, n_image)."""
        arr = _as_int_array(codes, "image codes")
        if expected is not None and arr.size != expected:
            raise ValueError(f"expected {expected} image codes, got {arr.size}")
        bad = (arr < 0) | (arr >= self.n_image)
        if bad.any():
            pos = int(np.argmax(bad))
            raise ValueError(f"image code {int(arr[pos])} at position {pos} is outside "
                             f"[0, {self.n_image})")
        return (arr + self.n_text).astype(np.int32)

    def is_image_id(self, ids: Any) -> np.ndarray | bool:
        """Whether each id is an image-code id (an array for array input, a bool for an int)."""
        arr = np.asarray(ids)
        out = (arr >= self.n_text) & (arr < self.n_valid)
        return bool(out) if out.ndim == 0 else out

    def codes_from_ids(self, ids: Any, expected: int | None = None,
                       after_response: bool = False) -> np.ndarray:
        """The image codes (int32) in a token sequence, in order.

        `after_response=True` looks only after the first `### Response:\\n` (a full prompt + output
        of image -> report carries the input image in its prompt). `expected` checks the count.
        """
        arr = _as_int_array(ids, "ids")
        if after_response:
            hits = np.flatnonzero(arr == self.response_id)
            if hits.size == 0:
                raise ValueError(f"no {RESPONSE_KEY_NL!r} (id {self.response_id}) in the sequence")
            arr = arr[hits[0] + 1:]
        pad_rows = (arr >= self.n_valid) | (arr < 0)
        if pad_rows.any():
            pos = int(np.argmax(pad_rows))
            raise ValueError(f"id {int(arr[pos])} at position {pos} is outside the vocabulary "
                             f"[0, {self.n_valid})")
        codes = (arr[arr >= self.n_text] - self.n_text).astype(np.int32)
        if expected is not None and codes.size != expected:
            raise ValueError(f"expected {expected} image tokens, found {codes.size}")
        return codes

    def ids_with_image(self, text: str, codes: Any, expected: int | None = None) -> list[int]:
        """Tokenise `text`, replacing its one `IMAGE_PLACEHOLDER` with the ids of `codes`.

        The whole text is tokenised as LLM-CXR does; if the placeholder's own tokens are not found
        intact (it merged with a neighbouring character, e.g. `" <image>."`), the text on either
        side of it is tokenised separately instead.
        """
        count = text.count(IMAGE_PLACEHOLDER)
        if count != 1:
            raise ValueError(f"expected exactly one {IMAGE_PLACEHOLDER!r} placeholder in the text, "
                             f"found {count}")
        image = self.image_ids(codes, expected=expected).tolist()
        if self.image_brackets:
            image = self._bracket_ids[0] + image + self._bracket_ids[1]
        ids = self.encode(text)
        pattern = self._placeholder_ids
        n = len(pattern)
        starts = [i for i in range(len(ids) - n + 1) if ids[i:i + n] == pattern]
        if len(starts) == 1:
            s = starts[0]
            return ids[:s] + image + ids[s + n:]
        before, after = text.split(IMAGE_PLACEHOLDER)
        return self.encode(before) + image + self.encode(after)

    @functools.cached_property
    def _placeholder_ids(self) -> list[int]:
        return self.encode(IMAGE_PLACEHOLDER)

    @functools.cached_property
    def _bracket_ids(self) -> tuple[list[int], list[int]]:
        return self.encode("<"), self.encode(">")

    # ---- masks ---------------------------------------------------------------------------------

    def valid_token_mask(self) -> np.ndarray:
        """bool[embed_rows]: True on text and image ids, False on padding rows."""
        return np.arange(self.embed_rows) < self.n_valid

    def text_token_mask(self) -> np.ndarray:
        """bool[embed_rows]: True on text ids only."""
        return np.arange(self.embed_rows) < self.n_text

    def image_token_mask(self) -> np.ndarray:
        """bool[embed_rows]: True on image-code ids only."""
        rows = np.arange(self.embed_rows)
        return (rows >= self.n_text) & (rows < self.n_valid)

    # ---- persistence ---------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {"n_text": self.n_text, "n_image": self.n_image, "embed_rows": self.embed_rows,
                "image_brackets": self.image_brackets,
                "specials": {t: self._id(t) for t in DOLLY_SPECIALS}}

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write `tokenizer.json` and `llmcxr_vocab.json` into `directory` (atomically, per file)."""
        out = pathlib.Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / TOKENIZER_FILE, self.tokenizer.to_str(pretty=True))
        atomic_write_text(out / VOCAB_META_FILE, json.dumps(self.meta(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, n_image: int | None = None) -> "Vocab":
        """Load a saved Vocab (directory with `llmcxr_vocab.json`), else build one with
        `load_vocab`. `n_image=None` takes the saved value (or 1,024); a conflicting value raises."""
        p = pathlib.Path(path)
        meta_path = p / VOCAB_META_FILE if p.is_dir() else p.with_name(VOCAB_META_FILE)
        if not meta_path.exists():
            return load_vocab(p, n_image=DEFAULT_IMAGE_CODES if n_image is None else n_image)
        try:
            meta = json.loads(meta_path.read_text())
            saved_text, saved_image = int(meta["n_text"]), int(meta["n_image"])
            brackets = bool(meta.get("image_brackets", False))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: not a valid vocabulary file ({e!r})") from e
        if n_image is not None and n_image != saved_image:
            raise ValueError(f"{meta_path} says n_image={saved_image}, caller asked {n_image}")
        vocab = load_vocab(p, n_image=saved_image, image_brackets=brackets)
        if vocab.n_text != saved_text:
            raise ValueError(f"{meta_path} says n_text={saved_text} but the tokenizer beside it "
                             f"has {vocab.n_text} text ids")
        return vocab

    def to_transformers(self):
        """A transformers `PreTrainedTokenizerFast` with the same ids (for HF export)."""
        from transformers import PreTrainedTokenizerFast  # heavy import, only when asked

        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(self.tokenizer.to_str()),
            eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
            pad_token=self.tokenizer.id_to_token(self.pad_id),
            additional_special_tokens=list(DOLLY_SPECIALS))


def text_size(tokenizer: Tokenizer) -> int:
    """Number of text ids: one past the largest id (ids need not be contiguous)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def resolve_tokenizer_file(path: str | os.PathLike) -> pathlib.Path:
    """`path` itself if it is a file, else `path/tokenizer.json`; a clear error if missing."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: the directory must hold a fast tokenizer "
                                    f"({TOKENIZER_FILE}); hub names are not resolved")
    elif not p.exists():
        raise FileNotFoundError(f"tokenizer file {p} not found (hub names are not resolved)")
    return p


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """None when two tokenizers are the same in content (token -> id map, merges, added tokens and
    their flags, normalizer, pre-tokenizer, decoder; truncation and padding settings aside), else
    the first difference found, in words. Equal sizes are not enough: a BPE trained to 50,280 ids
    has the size of dolly-v2's vocabulary and none of its id -> text mapping."""
    ids_a, ids_b = a.get_vocab(with_added_tokens=True), b.get_vocab(with_added_tokens=True)
    if ids_a != ids_b:
        first = min(set(ids_a.items()) ^ set(ids_b.items()), key=lambda item: (item[1], item[0]))
        token = first[0]
        return (f"{len(ids_a)} vs {len(ids_b)} tokens; token {token!r} is id "
                f"{ids_a.get(token, 'absent')} vs {ids_b.get(token, 'absent')}")
    json_a, json_b = json.loads(a.to_str()), json.loads(b.to_str())
    for part in sorted((json_a.keys() | json_b.keys()) - {"truncation", "padding"}):
        if json_a.get(part) != json_b.get(part):
            return f"same token ids but different {part!r} (merges, flags or text rules)"
    return None


def gpt_neox_20b_dir() -> pathlib.Path:
    """The directory of the GPT-NeoX-20B tokenizer shipped as package data (`tokenizer.json`;
    provenance and licence in its README.md), for tests and benchmarks without network access."""
    return pathlib.Path(str(importlib.resources.files("llmcxr_jax.text") / "gpt_neox_20b"))


def add_dolly_specials(tokenizer: Tokenizer) -> Tokenizer:
    """Add `### End`, `### Instruction:`, `### Response:\\n` as special tokens, in that order, as
    dolly-v2's `add_special_tokens({"additional_special_tokens": [...]})` does. Tokens already
    present keep their ids. Mutates and returns `tokenizer`."""
    for token in DOLLY_SPECIALS:
        if tokenizer.token_to_id(token) is None:
            tokenizer.add_special_tokens(
                [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)])
    return tokenizer


def load_vocab(path: str | os.PathLike, n_image: int = DEFAULT_IMAGE_CODES,
               image_brackets: bool = False) -> Vocab:
    """A Vocab from a local `tokenizer.json` or HF tokenizer directory, with the Dolly specials.

    On the GPT-NeoX-20B tokenizer the specials get 50277, 50278, 50279 (50,280 text ids). A
    tokenizer that already has them keeps its ids; n_text is always the tokenizer's full size, so
    added tokens past the specials stay text ids and the image ids start after them. (dolly-v2's
    released tokenizer has `### Response:` without the newline at 50279; LLM-CXR then added
    `### Response:\\n` as 50280 and started its image ids at 50281; loading such a directory here
    gives that same layout.)
    """
    file = resolve_tokenizer_file(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{file}: not a valid tokenizers JSON file ({e})") from e
    add_dolly_specials(tokenizer)
    if tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"{file}: the tokenizer has no {EOS_TOKEN!r} token")
    return Vocab(tokenizer=tokenizer, n_text=text_size(tokenizer), n_image=n_image,
                 image_brackets=image_brackets)


def ids_with_image(vocab: Vocab, text: str, codes: Any, expected: int | None = None) -> list[int]:
    """Module-level alias of `Vocab.ids_with_image`."""
    return vocab.ids_with_image(text, codes, expected=expected)
