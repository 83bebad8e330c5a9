#!/usr/bin/env python3
"""Golden LoftQ data from PEFT + bitsandbytes (model/compensation.h's svd and loftq methods).

PEFT 0.21's loftq_init runs bitsandbytes' NF4 quantizer on a CUDA device only; this machine has
none, so the loop below is loftq_init's, line for line, with the same two independent pieces on
the CPU: bitsandbytes' NF4 (Params4bit defaults: blocks of 64, fp32 absmax, no double
quantization) and PEFT's own _low_rank_decomposition (torch.linalg.svd, L = U sqrt(S),
R = sqrt(S) Vh).

tests/data/loftq_golden.bin: u32 rows, cols, rank, n_cases; W (float32, row-major); then per
case u32 iterations, the dequantized weight of the last iteration, L @ R (float32).
Needs: pip install torch peft bitsandbytes (the oracles venv of scripts/setup.sh --oracles).
"""
import struct
import numpy as np
import torch
import bitsandbytes as bnb
from peft.utils.loftq_utils import _low_rank_decomposition


def nf4(x):
    packed, state = bnb.functional.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, state)


def loftq(weight, rank, num_iter):
    res = weight.clone()
    for i in range(num_iter):
        deq = nf4(res)
        res = weight - deq
        out = _low_rank_decomposition(res, reduced_rank=rank)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return deq, L @ R


def main():
    rng = np.random.default_rng(20261206)
    rows, cols, rank = 64, 128, 8
    # A weight-like matrix: Gaussian, a low-rank part and a few large input channels.
    w = rng.standard_normal((rows, cols)) * 0.02 + (rng.standard_normal((rows, 4)) @ rng.standard_normal((4, cols))) * 0.01
    w[:, [3, 70]] *= 6.0
    w = torch.tensor(w, dtype=torch.float32)
    cases = [1, 5]
    with open("tests/data/loftq_golden.bin", "wb") as f:
        f.write(struct.pack("<IIII", rows, cols, rank, len(cases)))
        f.write(w.numpy().astype("<f4").tobytes())
        for it in cases:
            deq, lr = loftq(w, rank, it)
            f.write(struct.pack("<I", it))
            f.write(deq.numpy().astype("<f4").tobytes())
            f.write(lr.numpy().astype("<f4").tobytes())
            rel = torch.linalg.norm(w - deq - lr) / torch.linalg.norm(w)
            print(f"iterations {it}: ||W - Q - LR|| / ||W|| = {rel:.6f} (before: {torch.linalg.norm(w - nf4(w)) / torch.linalg.norm(w):.6f})")


if __name__ == "__main__":
    main()
