"""Decode speed: our jitted KV-cache generation vs transformers `generate`, same weights.

pythia-70m shape with the extended vocabulary (51,328 rows), random weights, a 64-token prompt,
256 new tokens, top-p sampling (0.92, top_k 0, temperature 1) as LLM-CXR samples reports; no
stop token, so both sides produce exactly 256 tokens. Batch 1 and batch 8. The first call
(compilation for us, warm-up for PyTorch) is timed separately; the table shows the median of
`--repeats` timed calls, ours and the reference interleaved so both see the same machine load.

    python bench/decode.py            # full run
    python bench/decode.py --quick    # smoke run (short prompt, 32 tokens)

Prints a table, then one JSON object as the last line; `ratio_vs_reference` is reference
seconds / ours at batch 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llmcxr_jax.configs import DOLLY_TEXT_IDS, IMAGE_CODES, ModelConfig, model_preset  # noqa: E402
from llmcxr_jax.llm import hf_mapping  # noqa: E402
from llmcxr_jax.llm.constraints import valid_vocab_mask  # noqa: E402
from llmcxr_jax.llm.generate import GenerationConfig, generate  # noqa: E402


def hf_model(config: ModelConfig, seed: int) -> "transformers.GPTNeoXForCausalLM":
    """A randomly initialised transformers GPT-NeoX of our config's shape (fp32, eval mode)."""
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        rope_parameters={"rope_type": "default", "rope_theta": config.rotary_emb_base,
                         "partial_rotary_factor": config.rotary_pct},
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps, use_parallel_residual=config.use_parallel_residual,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(hf_config).eval()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int, top_p: float,
        threads: int, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    config = model_preset("pythia-70m")
    model = hf_model(config, seed)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = hf_mapping.params_from_state_dict(state, config, to_array=jnp.asarray)
    valid = valid_vocab_mask(config.vocab_size, DOLLY_TEXT_IDS + IMAGE_CODES)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
                           top_p=top_p)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    hf_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=top_p,
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    rng = np.random.default_rng(seed)
    results = {}
    for batch in batch_sizes:
        ids = rng.integers(0, DOLLY_TEXT_IDS, (batch, prompt_len)).astype(np.int32)
        mask = np.ones_like(ids)
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

        def ours(key: int) -> None:
            out = generate(params, config, ids, mask, jax.random.key(key), gen, valid_mask=valid)
            tokens = np.asarray(jax.block_until_ready(out.tokens))
            if tokens.shape != (batch, new_tokens) or not (np.asarray(out.lengths) == new_tokens).all():
                raise RuntimeError(f"ours produced lengths {np.asarray(out.lengths)}")

        def reference() -> None:
            with torch.no_grad():
                out = model.generate(input_ids=ids_t, attention_mask=mask_t, **hf_kwargs)
            if out.shape != (batch, prompt_len + new_tokens):
                raise RuntimeError(f"transformers produced shape {tuple(out.shape)}")

        first_ours = _timed(lambda: ours(0))
        first_ref = _timed(reference)
        times_ours, times_ref = [], []
        for r in range(repeats):
            times_ours.append(_timed(lambda: ours(r + 1)))
            times_ref.append(_timed(reference))
        ours_s, ref_s = statistics.median(times_ours), statistics.median(times_ref)
        results[batch] = {
            "ours_s": ours_s, "reference_s": ref_s, "speedup": ref_s / ours_s,
            "ours_tokens_per_s": batch * new_tokens / ours_s,
            "reference_tokens_per_s": batch * new_tokens / ref_s,
            "ours_first_call_s": first_ours, "reference_first_call_s": first_ref,
            "ours_compile_s": max(first_ours - ours_s, 0.0),
            "ours_all_s": times_ours, "reference_all_s": times_ref,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 16-token prompt, 32 new")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=0.92)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = 16, 32, 1
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    results = run(batch_sizes, args.prompt_len, args.new_tokens, args.repeats, args.top_p,
                  args.threads)
    print(f"decode: pythia-70m shape, vocab 51,328, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, top_p {args.top_p}, median of {args.repeats}")
    print(f"{'batch':>5} {'ours s':>8} {'ref s':>8} {'speedup':>8} {'ours tok/s':>11} "
          f"{'ref tok/s':>10} {'compile s':>10}")
    for batch, r in results.items():
        print(f"{batch:>5} {r['ours_s']:>8.3f} {r['reference_s']:>8.3f} {r['speedup']:>7.2f}x "
              f"{r['ours_tokens_per_s']:>11.1f} {r['reference_tokens_per_s']:>10.1f} "
              f"{r['ours_compile_s']:>10.2f}")
    summary = {
        "bench": "decode", "model": "pythia-70m", "vocab_rows": 51_328,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "top_p": args.top_p,
        "repeats": args.repeats, "torch_threads": args.threads, "quick": args.quick,
        "jax_device": str(jax.devices()[0].device_kind), "machine": platform.machine(),
        "results": {str(b): {k: v for k, v in r.items() if not k.endswith("_all_s")}
                    for b, r in results.items()},
    }
    if 1 in results:
        summary["ratio_vs_reference"] = results[1]["speedup"]
        summary["batch1_ours_s"] = results[1]["ours_s"]
        summary["batch1_reference_s"] = results[1]["reference_s"]
    if 8 in results:
        summary["ratio_vs_reference_batch8"] = results[8]["speedup"]
        summary["batch8_ours_tokens_per_s"] = results[8]["ours_tokens_per_s"]
        summary["batch8_reference_tokens_per_s"] = results[8]["reference_tokens_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
