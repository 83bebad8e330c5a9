#!/usr/bin/env python3
"""PEFT loads the adapters fedtune's federated runs export for each family and reproduces
fedtune's logits (issue 19). Not run in CI (needs torch + peft):

  FEDTUNE_FAMILY_DUMP=/tmp/families build/tests/family_test --gtest_filter='*FederatedFineTune*'
  ~/.cache/fedtune-oracles/bin/python tests/oracles/check_family_exports.py /tmp/families LLAMA_CPP_DIR

For each family: transformers loads tests/data/families/<family> (the model the run's GGUF was
converted from), PEFT loads the run's peft/ folder, and the logits on the golden tokens are
compared with fedtune's on the same folder and adapter. llama.cpp (llama-cpp-python) loads an
F32 conversion of the folder (its own converter, LLAMA_CPP_DIR as in gen_family_golden.py) with
the run's GGUF-LoRA: its logits are compared with PEFT's (both exact fp32). Prints one JSON
object."""
import json
import os
import sys

import peft
import safetensors.torch
import torch
import transformers

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "families")


def main():
    dump = sys.argv[1]
    out = {}
    for fam in sorted(os.listdir(dump)):
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(HERE, fam), dtype=torch.float32, attn_implementation="eager")
        pm = peft.PeftModel.from_pretrained(model, os.path.join(dump, fam, "peft"))
        pm.eval()
        tokens = safetensors.torch.load_file(os.path.join(HERE, fam, "golden.safetensors"))["tokens"].long()
        with torch.no_grad():
            ours = pm(tokens[None]).logits[0]
        ft = safetensors.torch.load_file(os.path.join(dump, fam, "fedtune_logits.safetensors"))
        scale = float(ours.abs().max())
        out[fam] = {"peft_max_rel_diff": float((ours - ft["logits"]).abs().max()) / scale, "logit_scale": scale}
        # llama.cpp: F32 conversion of the folder + the run's GGUF-LoRA, F32 K/V cache.
        import llama_cpp
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gen_family_golden
        f32 = os.path.join(dump, fam, "base-f32.gguf")
        gen_family_golden.convert(os.path.abspath(sys.argv[2]), fam, os.path.join(HERE, fam), "f32", f32)
        m = llama_cpp.Llama(model_path=f32, lora_path=os.path.join(dump, fam, "adapter-lora.gguf"), n_ctx=64, logits_all=True,
                            verbose=False, n_threads=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        m.eval(tokens.tolist())
        lc = torch.tensor(m.scores[: len(tokens)], dtype=torch.float32)
        out[fam]["gguf_lora_llamacpp_vs_peft_max_rel_diff"] = float((lc - ours).abs().max()) / scale
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(json.dumps(out, indent=1))
    out["versions"]["llama_cpp_python"] = __import__("llama_cpp").__version__
    # gemma2/3: llama.cpp's converter rounds the (1 + w) norms to F16 and ggml's GELU is an fp16 table: ~7e-3 here.
    ok = all(v["peft_max_rel_diff"] < 1e-4 and v["gguf_lora_llamacpp_vs_peft_max_rel_diff"] < (1e-2 if k in ("gemma2", "gemma3") else 1e-4)
             for k, v in out.items() if k != "versions")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
