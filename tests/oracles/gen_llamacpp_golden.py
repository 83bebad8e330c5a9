#!/usr/bin/env python3
"""Golden logits and perplexity for SmolLM2-135M-Instruct Q4_1 from llama.cpp (llama-cpp-python).

For each prompt: llama.cpp's token ids, and at every position its greedy next token plus the
log-probability of that token. Perplexity on /usr/share/common-licenses/GPL-3 with the same
sliding-window definition as fedtune (model/perplexity.h): windows of W tokens advancing by S,
each token scored once by the first window holding it with >= 1 token of context, each window
evaluated from an empty cache.
Writes tests/data/smollm2_llamacpp_golden.json.
"""
import json, sys
import numpy as np
import llama_cpp

PROMPTS = [
    ("plain", "The quick brown fox jumps over the lazy dog. The capital of France is"),
    ("chat", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
             "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"),
    ("numbers", "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987"),
    ("unicode", "Paris est la capitale de la France. 東京は日本の首都です。 Москва — столица России."),
    ("license", "This program is free software: you can redistribute it and/or modify it under the terms of the GNU General Public License"),
]

def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

def sliding_window_nll(llm, toks, W, S):
    """fedtune's perplexity definition (model/perplexity.h) on llama.cpp: windows of W tokens
    advancing by S, each token scored once. Returns (summed NLL, tokens scored)."""
    nll, n, prev_end, begin = 0.0, 0, 0, 0
    while True:
        end = min(begin + W, len(toks))
        llm.reset()
        llm.eval(toks[begin:end])
        lp = log_softmax(np.array(llm.scores[: end - begin]))
        for j in range(max(prev_end, begin + 1), end):
            nll -= lp[j - 1 - begin, toks[j]]
            n += 1
        prev_end = end
        if end == len(toks):
            return nll, n
        begin += S

def run(model, W, S):
    llm = llama_cpp.Llama(model_path=model, n_ctx=W, n_batch=W, logits_all=True, n_threads=2, verbose=False)
    out = {"oracle": f"llama-cpp-python {llama_cpp.__version__}", "model": model.split("/")[-1], "prompts": []}
    for name, text in PROMPTS:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        lp = log_softmax(np.array(llm.scores[: len(ids)]))
        top = lp.argmax(axis=-1)
        out["prompts"].append({"name": name, "text": text, "ids": ids, "argmax": top.tolist(),
                               "argmax_logprob": [float(lp[i, t]) for i, t in enumerate(top)]})
    text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()
    toks = llm.tokenize(text.encode(), add_bos=False, special=False)
    nll, n = sliding_window_nll(llm, toks, W, S)
    out["perplexity"] = {"file": "/usr/share/common-licenses/GPL-3", "window": W, "stride": S, "n_tokens": len(toks),
                         "n_scored": n, "mean_nll": nll / n, "ppl": float(np.exp(nll / n))}
    return out

def main():
    """argv: the Q4_1 model and its F32 copy (tests/oracles/make_f32_gguf.py). llama.cpp on the Q4_1
    file quantizes activations to 8 bits inside its matmuls; on the F32 copy it computes the exact
    function of the dequantized weights in fp32, which is what fedtune computes."""
    q4 = sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    f32 = sys.argv[2]
    out = {"q4_1": run(q4, 512, 256), "f32": run(f32, 512, 256)}
    json.dump(out, open("tests/data/smollm2_llamacpp_golden.json", "w"), ensure_ascii=False, indent=0)
    print({k: v["perplexity"] for k, v in out.items()})

if __name__ == "__main__":
    main()
