#!/usr/bin/env python3
"""Phi-3 LongRoPE (rope_type "longrope": Phi-3 128k / Phi-3.5 models) against Hugging Face
transformers and llama.cpp (issue 19). The tiny phi3 model of tests/data/families/phi3 with
LongRoPE: short and long factors (4 each, head size 8), original_max_position_embeddings 8 of
256 positions (so the attention factor is sqrt(1 + ln 32 / ln 8) = 1.633).

Writes tests/data/families/phi3/:
  longrope_config.json          the config (the test copies it beside the folder's weights)
  longrope.q8_0.gguf            the folder with that config converted by llama.cpp's converter
  longrope_golden.safetensors
    "logits_long"   transformers, float64, on gen_family_golden's 12 TOKENS (12 > 8: long factors)
    "logits_short"  the same on the first 8 tokens (short factors)
    "logits_lora_long", "nll_lora_long" and per PEFT adapter tensor "<name>.grad": with the
                    folder's PEFT adapter, on the 12 tokens
    "llamacpp_f32_long"  llama-cpp-python on an F32 conversion, n_ctx 64 (> 8: long factors)
    "llamacpp_q8_0_long" llama-cpp-python on longrope.q8_0.gguf, n_ctx 64 (F16)
  llama.cpp picks the long factors when its context exceeds the original one, and pads every
  context to 256 tokens: with an original context of 8 its short factors are unreachable, so
  they are checked against transformers only.

Run from the repository root in the oracle venv:
  ~/.cache/fedtune-oracles/bin/python tests/oracles/gen_longrope_golden.py LLAMA_CPP_DIR
(LLAMA_CPP_DIR as for gen_family_golden.py).
"""
import json
import os
import shutil
import sys
import tempfile

import peft
import safetensors.torch
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_family_golden as fam  # noqa: E402

SHORT = [1.0, 1.25, 1.6, 2.2]
LONG = [1.0, 3.0, 9.0, 27.0]
ORIG = 8


def llama_cpp_logits(path, tokens, n_ctx):
    import llama_cpp
    m = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1,
                        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    m.eval(tokens)
    return torch.tensor(m.scores[: len(tokens)], dtype=torch.float32).contiguous()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    llama_cpp_dir = os.path.abspath(sys.argv[1])
    src = os.path.join(fam.OUT, "phi3")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                              "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": ORIG}
    cfg["original_max_position_embeddings"] = ORIG
    with open(os.path.join(src, "longrope_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    d = tempfile.mkdtemp()
    for f in ("model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), os.path.join(d, f))
    shutil.copy(os.path.join(src, "longrope_config.json"), os.path.join(d, "config.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager")
    model.eval()
    tokens = fam.TOKENS
    golden = {}
    with torch.no_grad():
        golden["logits_long"] = model(torch.tensor([tokens])).logits[0].float().contiguous()
        golden["logits_short"] = model(torch.tensor([tokens[:ORIG]])).logits[0].float().contiguous()
    pm = peft.PeftModel.from_pretrained(model, os.path.join(src, "adapter"), is_trainable=True)
    pm.to(torch.float64)
    ids = torch.tensor([tokens])
    out = pm(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
    nll.backward()
    golden["logits_lora_long"] = out.detach().float().contiguous()
    golden["nll_lora_long"] = nll.detach().float().reshape(1)
    for pname, p in pm.named_parameters():
        if "lora_" in pname:
            golden[pname.replace(".default", "") + ".grad"] = p.grad.detach().float().contiguous()
    f32 = os.path.join(d, "f32.gguf")
    fam.convert(llama_cpp_dir, "phi3", d, "f32", f32)
    fam.convert(llama_cpp_dir, "phi3", d, "q8_0", os.path.join(src, "longrope.q8_0.gguf"))
    golden["llamacpp_f32_long"] = llama_cpp_logits(f32, tokens, 64)
    golden["llamacpp_q8_0_long"] = llama_cpp_logits(os.path.join(src, "longrope.q8_0.gguf"), tokens, 64).half()
    import llama_cpp
    safetensors.torch.save_file(golden, os.path.join(src, "longrope_golden.safetensors"),
                                metadata={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                                          "llama_cpp_python": llama_cpp.__version__})
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    print("llama.cpp F32 vs transformers (long factors)", rel(golden["llamacpp_f32_long"], golden["logits_long"]))
    print("long vs short factors on the first 8 tokens", rel(golden["logits_long"][:ORIG], golden["logits_short"]))
    shutil.rmtree(d)


if __name__ == "__main__":
    sys.exit(main())
