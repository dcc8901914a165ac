"""Train a small byte-level BPE tokenizer (HF `tokenizers`) for the tiny presets.

The result has GPT-NeoX's layout at a small scale: 0 `<|endoftext|>`, 1 `<|padding|>`, the 256
byte symbols, the learned merges, then the three Dolly specials as the last text ids, so that
`n_text == vocab_size` exactly (the tiny model preset assumes 2,048). A corpus too small to learn
that many merges is topped up with unused `<|reserved_k|>` tokens before the Dolly specials, so the
id layout never depends on the corpus size. Training is deterministic for a given corpus.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Iterable, Iterator, Sequence

from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import (DEFAULT_IMAGE_CODES, DOLLY_SPECIALS, EOS_TOKEN, PAD_TOKEN, Vocab,
                                   add_dolly_specials, text_size)

RESERVED_TEMPLATE = "<|reserved_{}|>"
DEFAULT_JSONL_FIELDS = ("report", "instruction", "context", "response", "question", "answer",
                        "text")
_BASE_SPECIALS = (EOS_TOKEN, PAD_TOKEN)


def prompt_corpus(repeats: int = 8) -> list[str]:
    """The fixed prompt text (Dolly's blurb, `Input:`, the placeholder, the twenty LLM-CXR
    instructions), repeated so every word clears `min_frequency`. It is in every training example,
    so `train_bpe` adds it to the corpus by default. The Dolly keys are special tokens already."""
    texts = [prompts.INTRO_BLURB, prompts.INPUT_KEY, prompts.IMAGE_PLACEHOLDER,
             *prompts.REPORT_TO_IMAGE_INSTRUCTIONS, *prompts.IMAGE_TO_REPORT_INSTRUCTIONS]
    return texts * repeats


def _empty_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = 2048, n_image: int = DEFAULT_IMAGE_CODES,
              min_frequency: int = 2, include_prompt_text: bool = True,
              show_progress: bool = False) -> Vocab:
    """A byte-level BPE Vocab with exactly `vocab_size` text ids (Dolly specials included)."""
    n_fixed = len(_BASE_SPECIALS) + len(DOLLY_SPECIALS)
    n_alphabet = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_fixed + n_alphabet:
        raise ValueError(f"vocab_size={vocab_size} is below the {n_fixed + n_alphabet} ids that "
                         f"the byte alphabet and special tokens take")
    counter = _Counted(texts)
    corpus: Iterable[str] = _chain(prompt_corpus(), counter) if include_prompt_text else counter
    tokenizer = _empty_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(DOLLY_SPECIALS), min_frequency=min_frequency,
        special_tokens=list(_BASE_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if counter.count == 0:
        raise ValueError("the BPE corpus is empty: no text was read")
    learned = text_size(tokenizer)
    reserved = vocab_size - len(DOLLY_SPECIALS) - learned
    if reserved > 0:
        print(f"train_bpe: the corpus gave {learned} ids; adding {reserved} unused reserved ids to "
              f"reach {vocab_size}", file=sys.stderr)
        tokenizer.add_special_tokens([AddedToken(RESERVED_TEMPLATE.format(k), special=True,
                                                 normalized=False) for k in range(reserved)])
    add_dolly_specials(tokenizer)
    n_text = text_size(tokenizer)
    if n_text != vocab_size:  # the trainer never overshoots; this guards the layout invariant
        raise RuntimeError(f"trained tokenizer has {n_text} text ids, expected {vocab_size}")
    return Vocab(tokenizer=tokenizer, n_text=n_text, n_image=n_image)


class _Counted:
    """An iterable that counts the items it yields."""

    def __init__(self, items: Iterable[str]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.count += 1
            yield item


def _chain(first: Sequence[str], rest: Iterable[str]) -> Iterator[str]:
    yield from first
    yield from rest


class CorpusStats:
    """Counts of what `iter_corpus_texts` read and skipped."""

    def __init__(self) -> None:
        self.files = 0
        self.texts = 0
        self.bad_lines = 0

    def __repr__(self) -> str:
        return f"CorpusStats(files={self.files}, texts={self.texts}, bad_lines={self.bad_lines})"


def _corpus_files(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for raw in paths:
        p = pathlib.Path(raw)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl")
                                and f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    return files


def iter_corpus_texts(paths: Sequence[str | os.PathLike],
                      jsonl_fields: Sequence[str] = DEFAULT_JSONL_FIELDS,
                      stats: CorpusStats | None = None) -> Iterator[str]:
    """Texts from files and folders: a `.txt` file is one text; each `.jsonl` line gives its
    string values under `jsonl_fields`. Folders are walked for `.txt` and `.jsonl` in sorted
    order. JSONL lines that are not JSON objects are skipped and counted in `stats`."""
    stats = stats if stats is not None else CorpusStats()
    for file in _corpus_files(paths):
        stats.files += 1
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:
                        stats.bad_lines += 1
                        print(f"{file}:{line_no}: skipped ({e})", file=sys.stderr)
                        continue
                    for field in jsonl_fields:
                        value = record.get(field)
                        if isinstance(value, str) and value:
                            stats.texts += 1
                            yield value
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                stats.texts += 1
                yield text
