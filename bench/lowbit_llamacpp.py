#!/usr/bin/env python3
"""llama.cpp's side of issue 23's perplexity table (the uncompensated rows' oracle).

Quantizes the real model with llama.cpp's own quantizer (llama-cpp-python's
llama_model_quantize, --pure so every tensor that can be takes the type; rows that are not a
multiple of 256 get llama.cpp's fallback), then scores the first MAX_TOKENS tokens of GPL-3 with
fedtune's sliding-window definition (window 512, stride 256, as tests/oracles/gen_llamacpp_golden.py).
Prints one line per file; run `fedtune perplexity FILE -f GPL-3 --max-tokens N` on the same files.
  python bench/lowbit_llamacpp.py [MAX_TOKENS] [OUT_DIR]   (oracles venv)
"""
import collections, ctypes, os, sys
import numpy as np
import gguf
import llama_cpp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "oracles"))
from gen_llamacpp_golden import sliding_window_nll  # the same scoring as the logit goldens

MAX = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
OUT = sys.argv[2] if len(sys.argv) > 2 else "runs/lowbit/llamacpp"
SRC = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
W, S = 512, 256


def quantize(name, ftype):
    out = os.path.join(OUT, f"smollm2-{name}.gguf")
    if not os.path.exists(out):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.allow_requantize, p.pure, p.nthread = ftype, True, True, 2
        assert llama_cpp.llama_model_quantize(SRC.encode(), out.encode(), ctypes.byref(p)) == 0
    r = gguf.GGUFReader(out)
    kinds = collections.Counter(t.tensor_type.name for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return out, dict(kinds)


def perplexity(path):
    llm = llama_cpp.Llama(model_path=path, n_ctx=W, n_batch=W, logits_all=True, n_threads=2, verbose=False)
    toks = llm.tokenize(open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read().encode(), add_bos=False, special=False)
    toks = toks[:MAX]  # no BOS: SmolLM2's add_bos_token is false (fedtune's EncodeWithBos adds none either)
    nll, n = sliding_window_nll(llm, toks, W, S)
    return float(np.exp(nll / n)), n


def main():
    os.makedirs(OUT, exist_ok=True)
    files = [(SRC, "as stored")]
    for name, ft in [("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q3_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S),
                     ("Q2_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K)]:
        path, kinds = quantize(name, ft)
        files.append((path, kinds))
    for path, kinds in files:
        ppl, n = perplexity(path)
        print(f"{path}: llama.cpp perplexity {ppl:.4f} over {n} tokens; projection types {kinds}")


if __name__ == "__main__":
    main()
