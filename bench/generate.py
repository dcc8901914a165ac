"""Report -> image generation speed: our task-level jitted generation vs transformers `generate`,
same weights, same prompts, same constraint.

pythia-70m shape with the extended vocabulary (GPT-NeoX-20B tokenizer + Dolly specials = 50,280
text ids, + 1,024 image ids, 51,328 rows), random weights. Prompts are the project's report ->
image prompts (`text.prompts`, phrasing 0) around phantom-style impressions. Both sides sample
(temperature 1, no top-k / top-p, as `inference.images_from_reports`) under the same constraint:
exactly `--image-tokens` image ids, then `### End` - ours through the logits-mask hook
(`constraints.image_then_end_mask`), transformers' through a `LogitsProcessor` doing the same - so
both generate identical lengths. Latency at batch 1, throughput at batch 16 (images per second).
The first call (compilation for us, warm-up for PyTorch) is timed separately; the table shows
the median of `--repeats` timed calls, ours and the reference interleaved. A greedy cross-check
(batch 1, a few tokens) reports whether both sides pick the same image tokens from the same
weights. The cost of classifier-free guidance (`--guidance`, default 3: each prompt's
unconditional twin decoded in the same loop) is timed against our plain sampling at every batch
size, interleaved in the same run (`guided_over_plain`: guided seconds / plain seconds).

    python bench/generate.py            # full run: 256 image tokens, batches 1 and 16
    python bench/generate.py --quick    # smoke run: 32 image tokens, batches 1 and 4

Prints a table, then one JSON object as the last line; `ratio_vs_reference` is reference
seconds / ours at batch 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from decode import _timed, hf_model  # noqa: E402  (bench/ is the script folder)
from llmcxr_jax.configs import IMAGE_CODES, model_preset  # noqa: E402
from llmcxr_jax.llm import hf_mapping, inference  # noqa: E402
from llmcxr_jax.llm.generate import GenerationConfig  # noqa: E402
from llmcxr_jax.text import prompts  # noqa: E402
from llmcxr_jax.text.vocab import gpt_neox_20b_dir, load_vocab  # noqa: E402

REPORTS = ("Moderate left pleural effusion.", "Mild cardiomegaly. No acute intrathoracic process.",
           "Large right pneumothorax.", "Extensive opacity in the lingula.",
           "Right internal jugular line in standard position. No acute intrathoracic abnormality.",
           "Mild pulmonary edema.", "No acute cardiopulmonary process.",
           "Small bilateral pleural effusions with bibasilar atelectasis.")


class ImageThenEnd(transformers.LogitsProcessor):
    """transformers' side of `constraints.image_then_end_mask`: image ids only for the first
    `n_tokens` generated tokens, then only `end_id`."""

    def __init__(self, prompt_len: int, image_offset: int, n_image: int, end_id: int,
                 n_tokens: int):
        self.prompt_len, self.n_tokens, self.end_id = prompt_len, n_tokens, end_id
        self.image = slice(image_offset, image_offset + n_image)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        if step < self.n_tokens:
            allowed[self.image] = True
        else:
            allowed[self.end_id] = True
        return scores.masked_fill(~allowed, float("-inf"))


def run(batch_sizes: list[int], n_tokens: int, repeats: int, threads: int, greedy_tokens: int,
        guidance: float, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    vocab = load_vocab(gpt_neox_20b_dir(), n_image=IMAGE_CODES)
    config = model_preset("pythia-70m")
    if vocab.embed_rows != config.vocab_size:
        raise RuntimeError(f"vocabulary rows {vocab.embed_rows} != model {config.vocab_size}")
    model = hf_model(config, seed)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = hf_mapping.params_from_state_dict(state, config, to_array=jnp.asarray)
    model.generation_config.pad_token_id = vocab.pad_id

    def hf_generate(reports: list[str], tokens: int, sample: bool) -> torch.Tensor:
        rows = [prompts.report_to_image_prompt_ids(vocab, r, 0) for r in reports]
        ids, mask = inference.left_pad(rows, vocab.pad_id)
        proc = ImageThenEnd(ids.shape[1], vocab.image_offset, vocab.n_image, vocab.end_id, tokens)
        kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(
            do_sample=False)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                 attention_mask=torch.tensor(mask, dtype=torch.long),
                                 logits_processor=transformers.LogitsProcessorList([proc]),
                                 max_new_tokens=tokens + 1, eos_token_id=vocab.end_id, **kwargs)
        new = out[:, ids.shape[1]:].numpy()
        ok = (new.shape[1] == tokens + 1 and (new[:, tokens] == vocab.end_id).all()
              and vocab.is_image_id(new[:, :tokens]).all())
        if not ok:
            raise RuntimeError(f"transformers did not produce {tokens} image ids then end")
        return new[:, :tokens] - vocab.image_offset

    def ours(reports: list[str], tokens: int, key: int, sample: bool = True,
             scale: float = 1.0) -> np.ndarray:
        gen = GenerationConfig(do_sample=sample, top_p=1.0)
        codes = inference.images_from_reports(params, config, vocab, reports, jax.random.key(key),
                                              tokens, gen, guidance=scale)
        if codes.shape != (len(reports), tokens):
            raise RuntimeError(f"ours produced codes of shape {codes.shape}")
        return codes

    # Greedy cross-check: the same weights pick the same image tokens.
    check = REPORTS[:1]
    g_ours = ours(check, greedy_tokens, 0, sample=False)
    g_ref = hf_generate(list(check), greedy_tokens, sample=False)
    greedy_agreement = float((g_ours == g_ref).mean())

    results = {}
    for batch in batch_sizes:
        reports = [REPORTS[i % len(REPORTS)] for i in range(batch)]
        first_ours = _timed(lambda: ours(reports, n_tokens, 0))
        first_ref = _timed(lambda: hf_generate(reports, n_tokens, True))
        first_guided = _timed(lambda: ours(reports, n_tokens, 0, scale=guidance))
        times_ours, times_ref, times_guided = [], [], []
        for r in range(repeats):
            times_ours.append(_timed(lambda: ours(reports, n_tokens, r + 1)))
            times_ref.append(_timed(lambda: hf_generate(reports, n_tokens, True)))
            times_guided.append(_timed(lambda: ours(reports, n_tokens, r + 1, scale=guidance)))
        ours_s, ref_s = statistics.median(times_ours), statistics.median(times_ref)
        guided_s = statistics.median(times_guided)
        results[batch] = {
            "ours_s": ours_s, "reference_s": ref_s, "speedup": ref_s / ours_s,
            "ours_images_per_s": batch / ours_s, "reference_images_per_s": batch / ref_s,
            "ours_tokens_per_s": batch * (n_tokens + 1) / ours_s,
            "reference_tokens_per_s": batch * (n_tokens + 1) / ref_s,
            "ours_first_call_s": first_ours, "reference_first_call_s": first_ref,
            "ours_compile_s": max(first_ours - ours_s, 0.0),
            "guided_s": guided_s, "guided_over_plain": guided_s / ours_s,
            "guided_images_per_s": batch / guided_s,
            "guided_compile_s": max(first_guided - guided_s, 0.0),
        }
    return {"results": results, "greedy_agreement": greedy_agreement,
            "greedy_tokens": greedy_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 image tokens, batches 1 and 4, one repeat")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--image-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--greedy-tokens", type=int, default=16,
                        help="tokens of the greedy cross-check (batch 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="classifier-free guidance scale timed against plain sampling")
    args = parser.parse_args()
    if args.quick:
        args.image_tokens, args.repeats, args.batch_sizes = 32, 1, "1,4"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.guidance == 1.0:
        parser.error("--guidance 1 is plain sampling; give another scale to time guidance")
    out = run(batch_sizes, args.image_tokens, args.repeats, args.threads, args.greedy_tokens,
              args.guidance)
    results = out["results"]
    print(f"report -> image: pythia-70m shape, vocab 51,328 (1,024 image ids), random weights, "
          f"{args.image_tokens} image tokens + end, median of {args.repeats}")
    print(f"{'batch':>5} {'ours s':>8} {'ref s':>8} {'speedup':>8} {'ours img/s':>11} "
          f"{'ref img/s':>10} {'compile s':>10} {'guided s':>9} {'guided/plain':>13}")
    for batch, r in results.items():
        print(f"{batch:>5} {r['ours_s']:>8.3f} {r['reference_s']:>8.3f} {r['speedup']:>7.2f}x "
              f"{r['ours_images_per_s']:>11.3f} {r['reference_images_per_s']:>10.3f} "
              f"{r['ours_compile_s']:>10.2f} {r['guided_s']:>9.3f} "
              f"{r['guided_over_plain']:>12.2f}x")
    print(f"greedy cross-check ({out['greedy_tokens']} image tokens, batch 1): "
          f"{out['greedy_agreement']:.0%} of tokens identical")
    summary = {
        "bench": "generate_report2image", "model": "pythia-70m", "vocab_rows": 51_328,
        "image_tokens": args.image_tokens, "repeats": args.repeats, "quick": args.quick,
        "torch_threads": args.threads, "jax_device": str(jax.devices()[0].device_kind),
        "machine": platform.machine(), "greedy_agreement": out["greedy_agreement"],
        "guidance": args.guidance,
        "results": {str(b): r for b, r in results.items()},
    }
    first, last = batch_sizes[0], batch_sizes[-1]
    summary["ratio_vs_reference"] = results[first]["speedup"]
    summary[f"batch{first}_latency_ours_s"] = results[first]["ours_s"]
    summary[f"batch{first}_latency_reference_s"] = results[first]["reference_s"]
    summary[f"batch{last}_ours_images_per_s"] = results[last]["ours_images_per_s"]
    summary[f"batch{last}_reference_images_per_s"] = results[last]["reference_images_per_s"]
    summary[f"ratio_vs_reference_batch{last}"] = results[last]["speedup"]
    summary[f"guided_over_plain_batch{first}"] = results[first]["guided_over_plain"]
    summary[f"guided_over_plain_batch{last}"] = results[last]["guided_over_plain"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
