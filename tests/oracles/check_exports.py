#!/usr/bin/env python3
"""Checks fedtune's adapter exports with the tools people serve models with.

  check_exports.py BASE.gguf ANSWERS.jsonl --gguf-lora L.gguf [--peft DIR] [--n 20]

ANSWERS.jsonl comes from `fedtune eval ... --dump` (prompt, reference, fedtune's greedy answer).
- gguf-py reads the GGUF-LoRA file (metadata, tensor shapes and types).
- llama.cpp (llama-cpp-python) loads the base with the GGUF-LoRA and answers each prompt
  greedily; we count answers identical to fedtune's.
- If torch, transformers and peft are installed: transformers loads the base from the GGUF
  (dequantized to fp32), PEFT loads the adapter folder, same greedy comparison.
Prints one JSON object."""
import argparse, json, sys

def greedy_llamacpp(llm, prompt, max_new, eot):
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(max_new):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        if nxt in eot:
            break
        out.append(nxt)
        llm.eval([nxt])
    return llm.detokenize(out).decode("utf-8", errors="replace")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("answers")
    ap.add_argument("--gguf-lora")
    ap.add_argument("--peft")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-new", type=int, default=48)
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.answers, encoding="utf-8")][: a.n]
    report = {"n": len(rows), "fedtune_exact_vs_reference": sum(r["fedtune"].strip() == r["reference"].strip() for r in rows)}
    if a.gguf_lora:
        import gguf
        r = gguf.GGUFReader(a.gguf_lora)
        report["gguf_py"] = {"general.type": r.fields["general.type"].contents(), "adapter.type": r.fields["adapter.type"].contents(),
                             "alpha": float(r.fields["adapter.lora.alpha"].contents()), "tensors": len(r.tensors),
                             "types": sorted({t.tensor_type.name for t in r.tensors})}
        import llama_cpp
        llm = llama_cpp.Llama(model_path=a.base, lora_path=a.gguf_lora, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
        eot = {llm.token_eos(), llm.tokenize(b"<|im_end|>", add_bos=False, special=True)[0]}
        same = 0
        for row in rows:
            got = greedy_llamacpp(llm, row["prompt"], a.max_new, eot)
            same += got == row["fedtune"]
            if got != row["fedtune"]:
                print(f"llama.cpp differs: {got!r} vs fedtune {row['fedtune']!r}", file=sys.stderr)
        report["llama_cpp_same_answer"] = f"{same}/{len(rows)} (llama-cpp-python {llama_cpp.__version__})"
    if a.peft:
        try:
            import os, torch, transformers, peft
        except ImportError as e:
            report["peft"] = f"not checked: {e}"
        else:
            d, f = os.path.split(os.path.abspath(a.base))
            tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
            base = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
            model = peft.PeftModel.from_pretrained(base, a.peft).eval()
            eot = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
            same = 0
            with torch.no_grad():
                for row in rows:
                    ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
                    out = []
                    for _ in range(a.max_new):
                        nxt = int(model(ids).logits[0, -1].argmax())
                        if nxt in eot:
                            break
                        out.append(nxt)
                        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
                    got = tok.decode(out)
                    same += got == row["fedtune"]
                    if got != row["fedtune"]:
                        print(f"PEFT differs: {got!r} vs fedtune {row['fedtune']!r}", file=sys.stderr)
            report["peft_same_answer"] = f"{same}/{len(rows)} (torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})"
    print(json.dumps(report, indent=1))

if __name__ == "__main__":
    main()
