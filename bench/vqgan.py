"""VQ-GAN encode / decode throughput: ours (jitted Flax) vs taming-transformers (PyTorch), same weights.

    python bench/vqgan.py            # taming-f16-1024, 256 px, batch 4
    python bench/vqgan.py --quick    # batch 1, fewer repetitions (smoke run)

Random weights are drawn by the PyTorch reference and imported through the project's taming
mapping, so both sides run the identical model; the run also checks that both give the same codes.
encode = image -> code indices (encoder, quant_conv, nearest code); decode = indices -> image
(codebook lookup, post_quant_conv, decoder). fp32 on CPU. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np  # noqa: E402


def _time(fn, iters: int) -> float:
    """Best-of-`iters` seconds of `fn()` after one warm-up call (which also compiles)."""
    fn()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="taming-f16-1024", help="VQ-GAN preset")
    parser.add_argument("--batch-size", type=int, default=4, help="images per call")
    parser.add_argument("--iters", type=int, default=3, help="timed repetitions (best is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="batch 1, 1 timed repetition")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.iters = 1, 1

    import jax
    import jax.numpy as jnp
    import torch
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    from llmcxr_jax.configs import vqgan_preset
    from llmcxr_jax.vqgan.model import VQGAN
    from llmcxr_jax.vqgan.taming_import import convert_state_dict, taming_ddconfig

    torch.set_num_threads(args.threads)
    cfg = vqgan_preset(args.model)
    dd = taming_ddconfig(cfg)

    # PyTorch reference: taming's modules, random weights.
    torch.manual_seed(0)
    ref = torch.nn.ModuleDict({
        "encoder": Encoder(**dd), "decoder": Decoder(**dd),
        "quantize": VectorQuantizer2(cfg.n_embed, cfg.embed_dim, beta=cfg.beta),
        "quant_conv": torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1),
        "post_quant_conv": torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)}).eval()
    params, _ = convert_state_dict(ref.state_dict(), cfg, source="bench reference")
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    x = np.clip(rng.standard_normal((args.batch_size, 3, cfg.resolution, cfg.resolution)) * 0.5, -1, 1).astype(np.float32)
    x_t = torch.from_numpy(x)
    x_j = jnp.asarray(x.transpose(0, 2, 3, 1))
    latent = (args.batch_size, cfg.latent_size, cfg.latent_size, cfg.embed_dim)

    def ref_encode():
        with torch.inference_mode():
            return ref["quantize"](ref["quant_conv"](ref["encoder"](x_t)))[2][2]

    codes_t = ref_encode().reshape(args.batch_size, cfg.latent_size, cfg.latent_size)

    def ref_decode():
        with torch.inference_mode():
            z_q = ref["quantize"].get_codebook_entry(codes_t.reshape(-1), latent)
            return ref["decoder"](ref["post_quant_conv"](z_q))

    model = VQGAN(cfg)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode).indices)
    decode = jax.jit(lambda p, i: model.apply({"params": p}, i, method=VQGAN.decode_code))
    codes_j = encode(params, x_j)
    same = float(np.mean(np.asarray(codes_j) == codes_t.numpy()))

    t0 = time.perf_counter()
    jax.block_until_ready(decode(params, codes_j))
    compile_decode = time.perf_counter() - t0

    times = {
        ("encode", "ours"): _time(lambda: jax.block_until_ready(encode(params, x_j)), args.iters),
        ("encode", "reference"): _time(ref_encode, args.iters),
        ("decode", "ours"): _time(lambda: jax.block_until_ready(decode(params, codes_j)), args.iters),
        ("decode", "reference"): _time(ref_decode, args.iters),
    }
    ips = {k: args.batch_size / v for k, v in times.items()}
    ratio = {op: ips[(op, "ours")] / ips[(op, "reference")] for op in ("encode", "decode")}

    print(f"VQ-GAN {args.model} ({cfg.resolution} px -> {cfg.latent_size}x{cfg.latent_size} codes), "
          f"batch {args.batch_size}, best of {args.iters}; {platform.machine()} {os.cpu_count()} cores, "
          f"torch threads {args.threads}, XLA: its own CPU thread pool (all cores), jax {jax.__version__} "
          f"on {jax.devices()[0].platform}")
    print(f"codes identical to the reference: {same:.2%}   (decode compile {compile_decode:.1f} s)")
    print(f"{'op':8s} {'ours img/s':>11s} {'ref img/s':>11s} {'ratio':>7s}")
    for op in ("encode", "decode"):
        print(f"{op:8s} {ips[(op, 'ours')]:11.3f} {ips[(op, 'reference')]:11.3f} {ratio[op]:7.2f}")
    result = {
        "bench": "vqgan", "preset": args.model, "batch": args.batch_size, "iters": args.iters,
        "resolution": cfg.resolution, "backend": jax.devices()[0].platform,
        "torch_threads": args.threads, "codes_identical": same,
        "images_per_s": {f"{op}_{side}": round(v, 4) for (op, side), v in ips.items()},
        "ratio_vs_reference": {op: round(r, 3) for op, r in ratio.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
