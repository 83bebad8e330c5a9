#!/usr/bin/env python3
"""Tiny random models of each decoder family fedtune runs, with Hugging Face transformers'
logits and PyTorch autograd + PEFT LoRA gradients on them (issue 19's oracles).

For each family this writes tests/data/families/<family>/:
  config.json, model.safetensors   the model (weights rounded to float16 and stored as F16, so
                                   fedtune and transformers compute in float32 on equal weights)
  adapter/                         a PEFT LoRA adapter (r=4, alpha=8, all seven projections,
                                   random A and B) saved by PEFT
  golden.safetensors               "tokens" (int32), "logits" (float32, base model),
                                   "logits_lora" (with the adapter), and per adapter tensor the
                                   gradient of the summed next-token NLL, named as PEFT names the
                                   tensor with ".grad" appended
  versions.json                    the versions that made them

Run from the repository root in the oracle venv:
  ~/.cache/fedtune-oracles/bin/python tests/oracles/gen_family_golden.py
"""
import copy
import json
import os
import shutil
import sys

import torch
import transformers
import peft
import safetensors.torch

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "families")
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5,
              hidden_act="silu", initializer_range=0.2)

FAMILIES = {
    # Llama 3.x: RoPE scaling (all three regimes of its ramp occur at head size 8, theta 1e4,
    # original context 64), untied output.
    "llama3": (transformers.LlamaConfig, dict(rope_theta=10000.0, tie_word_embeddings=False,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Qwen2/2.5: q/k/v biases, tied output.
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, head size 16 != hidden / heads (q is 64 wide on a 32 model).
    "qwen3": (transformers.Qwen3Config, dict(rope_theta=1000000.0, head_dim=16, tie_word_embeddings=True)),
    # Mistral: a sliding window longer than the test sequences (exact there; longer refused).
    "mistral": (transformers.MistralConfig, dict(rope_theta=10000.0, sliding_window=32, tie_word_embeddings=False)),
}
TOKENS = [1, 17, 42, 5, 88, 23, 64, 9, 31, 77, 2, 50, 13, 95, 40, 8, 61, 36, 70, 11]


def main():
    torch.manual_seed(0)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": getattr(safetensors, "__version__", "?")}
    for name, (cfg_cls, extra) in FAMILIES.items():
        d = os.path.join(OUT, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        cfg = cfg_cls(**COMMON, **extra)
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif pname.endswith(".bias"):
                    p.copy_(0.5 * torch.randn_like(p))
                p.copy_(p.half().float())  # representable in F16 exactly
        model.eval()
        # A copy goes to disk in F16: half() would also round the rotary inv_freq buffer of the
        # model the goldens come from.
        copy.deepcopy(model).half().save_pretrained(d, safe_serialization=True)
        ids = torch.tensor([TOKENS])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        pm = peft.get_peft_model(model, lcfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.3 * torch.randn_like(p))
        out = pm(ids).logits[0]
        nll = torch.nn.functional.cross_entropy(out[:-1].float(), ids[0, 1:], reduction="sum")
        nll.backward()
        golden = {"tokens": torch.tensor(TOKENS, dtype=torch.int32), "logits": logits.contiguous(),
                  "logits_lora": out.detach().float().contiguous(), "nll_lora": nll.detach().reshape(1)}
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                # PEFT's saved name: drop the adapter name ("lora_A.default.weight" -> "lora_A.weight").
                golden[pname.replace(".default", "") + ".grad"] = p.grad.detach().contiguous()
        pm.save_pretrained(os.path.join(d, "adapter"))
        safetensors.torch.save_file(golden, os.path.join(d, "golden.safetensors"))
        for extra in ("generation_config.json", os.path.join("adapter", "README.md")):
            if os.path.exists(os.path.join(d, extra)):
                os.remove(os.path.join(d, extra))
        with open(os.path.join(d, "versions.json"), "w") as f:
            json.dump(versions, f, indent=1)
        print(name, "nll", float(nll), "logit scale", float(logits.abs().max()))


if __name__ == "__main__":
    sys.exit(main())
