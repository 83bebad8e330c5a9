#!/usr/bin/env python3
"""Golden dequantization data from the `gguf` package's numpy code.

1. tests/data/dequant_golden.bin: for every block type fedtune reads, random blocks (random
   finite fp16 scales, random quant bytes) and gguf's dequantized float32 values.
   Record: u32 type id, u32 n_blocks, u32 type_size, u32 block_size, bytes, float32 values.
2. tests/data/smollm2_dequant_sha256.json: SHA-256 of every tensor of the real model
   dequantized to float32 by gguf (little-endian bytes), so CI checks bit-exactness cheaply.
"""
import hashlib, json, struct, sys
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K, T.Q2_K, T.Q3_K, T.Q5_K]
# byte offsets of fp16 scale fields inside a block (kept finite so NaN payloads don't matter)
FP16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
               T.Q4_K: [0, 2], T.Q6_K: [208],
               T.Q2_K: [80, 82], T.Q3_K: [108], T.Q5_K: [0, 2]}

def random_blocks(t, n, rng):
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    if t == T.F32:
        return rng.standard_normal(n * bs).astype(np.float32).view(np.uint8).reshape(n, ts)
    if t == T.F16:
        return (rng.standard_normal(n * bs) * 4).astype(np.float16).view(np.uint8).reshape(n, ts)
    if t == T.BF16:
        f = rng.standard_normal(n * bs).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, ts)
    b = rng.integers(0, 256, size=(n, ts), dtype=np.uint8)
    for off in FP16_FIELDS[t]:
        scale = (rng.standard_normal(n) * 0.05).astype(np.float16)
        scale[: n // 8] = (rng.standard_normal(n // 8) * 1e-6).astype(np.float16)  # subnormals
        b[:, off:off + 2] = scale.view(np.uint8).reshape(n, 2)
    return b

def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    rng = np.random.default_rng(20261123)
    with open("tests/data/dequant_golden.bin", "wb") as f:
        for t in TYPES:
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            n = max(1, 4096 // bs)
            blocks = random_blocks(t, n, rng)
            vals = dequantize(blocks.reshape(-1), t).astype(np.float32).reshape(-1)
            assert vals.size == n * bs
            f.write(struct.pack("<IIII", int(t), n, ts, bs))
            f.write(blocks.tobytes())
            f.write(vals.astype("<f4").tobytes())
    r = gguf.GGUFReader(model)
    out = {"model": model.split("/")[-1], "gguf_version": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
           "numpy": np.__version__, "tensors": {}}
    for t in r.tensors:
        vals = dequantize(t.data, t.tensor_type).astype("<f4")
        out["tensors"][t.name] = {"type": t.tensor_type.name, "n": int(vals.size),
                                  "sha256": hashlib.sha256(vals.tobytes()).hexdigest()}
    json.dump(out, open("tests/data/smollm2_dequant_sha256.json", "w"), indent=0, sort_keys=True)
    print("wrote", len(out["tensors"]), "tensor hashes")

if __name__ == "__main__":
    main()
