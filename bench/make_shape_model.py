#!/usr/bin/env python3
"""A random-weight GGUF of another shape and family with SmolLM2's vocabulary, to check the
planner's memory model away from the shape it was fitted on (docs/guide.md "Memory model"):

  ~/.cache/fedtune-oracles/bin/python bench/make_shape_model.py models/SmolLM2-135M-Instruct.Q4_1.gguf OUT.gguf

Default shape: qwen3 (per-head q/k norms), hidden 512, 12 layers, 8 heads of 96 (q width 768 !=
hidden), 2 KV heads, FFN 1792, Q8_0 weights, tied output. Weights are random (N(0, 0.02)): the
file measures memory and speed, not language."""
import argparse

import gguf
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("vocab_from")
    ap.add_argument("out")
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=96)
    ap.add_argument("--ff", type=int, default=1792)
    a = ap.parse_args()
    src = gguf.GGUFReader(a.vocab_from)
    w = gguf.GGUFWriter(a.out, "qwen3")
    arch = "qwen3"
    w.add_uint32(f"{arch}.embedding_length", a.embd)
    w.add_uint32(f"{arch}.block_count", a.layers)
    w.add_uint32(f"{arch}.feed_forward_length", a.ff)
    w.add_uint32(f"{arch}.attention.head_count", a.heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", a.kv_heads)
    w.add_uint32(f"{arch}.attention.key_length", a.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", a.head_dim)
    w.add_uint32(f"{arch}.context_length", 2048)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for k, f in src.fields.items():
        if not k.startswith("tokenizer."):
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            w.add_array(k, f.contents())
        elif t == gguf.GGUFValueType.STRING:
            w.add_string(k, f.contents())
        elif t == gguf.GGUFValueType.BOOL:
            w.add_bool(k, bool(f.contents()))
        else:
            w.add_uint32(k, int(f.contents()))
    n_vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def mat(name, rows, cols):
        x = rng.normal(0, 0.02, size=(rows, cols)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, q8), raw_dtype=q8)

    def vec(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    dq, dkv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    mat("token_embd.weight", n_vocab, a.embd)
    vec("output_norm.weight", a.embd)
    for l in range(a.layers):
        p = f"blk.{l}."
        vec(p + "attn_norm.weight", a.embd)
        vec(p + "ffn_norm.weight", a.embd)
        vec(p + "attn_q_norm.weight", a.head_dim)
        vec(p + "attn_k_norm.weight", a.head_dim)
        mat(p + "attn_q.weight", dq, a.embd)
        mat(p + "attn_k.weight", dkv, a.embd)
        mat(p + "attn_v.weight", dkv, a.embd)
        mat(p + "attn_output.weight", a.embd, dq)
        mat(p + "ffn_gate.weight", a.ff, a.embd)
        mat(p + "ffn_up.weight", a.ff, a.embd)
        mat(p + "ffn_down.weight", a.embd, a.ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
