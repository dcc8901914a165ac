"""Train the small byte-level BPE tokenizer of the tiny presets and save it as a Vocab.

    python launch/train_tokenizer.py --corpus DIR_OR_FILE [...] --out DIR [--vocab-size 2048]

Corpus: `.txt` files (one text each) and `.jsonl` files (string fields such as report,
instruction, context, response, question, answer); folders are walked recursively. DIR gets
`tokenizer.json` + `llmcxr_vocab.json`, loadable with `Vocab.load(DIR)`.
"""

from __future__ import annotations

from llmcxr_jax import cli
from llmcxr_jax.text import bpe


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--corpus", nargs="+", required=True, help="files or folders of text")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab-size", type=cli.positive_int, default=2048,
                        help="text ids incl. <|endoftext|>, <|padding|> and the Dolly specials")
    parser.add_argument("--n-image", type=cli.positive_int, default=1024,
                        help="image codes after the text ids")
    parser.add_argument("--min-frequency", type=cli.positive_int, default=2,
                        help="fewest occurrences of a pair to merge it")
    parser.add_argument("--jsonl-fields", default=",".join(bpe.DEFAULT_JSONL_FIELDS),
                        help="comma-separated JSONL fields to read")
    parser.add_argument("--no-prompt-text", action="store_true",
                        help="do not add the Dolly/LLM-CXR prompt text to the corpus")
    cli.add_no_progress(parser)
    args = parser.parse_args(argv)

    stats = bpe.CorpusStats()
    texts = bpe.iter_corpus_texts(args.corpus, jsonl_fields=tuple(args.jsonl_fields.split(",")),
                                  stats=stats)
    try:
        vocab = bpe.train_bpe(texts, vocab_size=args.vocab_size, n_image=args.n_image,
                              min_frequency=args.min_frequency,
                              include_prompt_text=not args.no_prompt_text,
                              show_progress=not args.no_progress)
    except ValueError as err:  # an empty corpus, a vocabulary smaller than the byte alphabet
        raise cli.Failure(cli.one_line(err)) from None
    out = vocab.save(args.out)
    print(f"read {stats}; saved {vocab} (embed_rows={vocab.embed_rows}) to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
