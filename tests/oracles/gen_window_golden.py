#!/usr/bin/env python3
"""Sliding-window attention against Hugging Face transformers (issue 19): the tiny models of
tests/data/families/{mistral,gemma2,gemma3,phi3} with their sliding window shrunk to WINDOW tokens,
shorter than the golden sequence, so the window masks keys.

For each family this writes tests/data/families/<family>/window_golden.safetensors:
  "logits"       transformers' float64 logits (stored float32) for gen_family_golden's TOKENS
  "logits_lora"  the same with the family's PEFT adapter (adapter/)
  gemma2 only (the window and the soft-capping together, in training): "nll_lora" and, per
  adapter tensor, the gradient of the summed next-token NLL, named as PEFT names the tensor
  with ".grad" appended

Run from the repository root in the oracle venv (scripts/setup.sh --oracles):
  ~/.cache/fedtune-oracles/bin/python tests/oracles/gen_window_golden.py
tests/model/family_test.cc (FamilyWindow.*) loads each folder with the same window and compares.
"""
import json
import os
import sys

import peft
import safetensors.torch
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_family_golden import OUT, TOKENS  # noqa: E402

WINDOW = 5
FAMILIES = ["mistral", "gemma2", "gemma3", "phi3"]


def main():
    for fam in FAMILIES:
        d = os.path.join(OUT, fam)
        cfg = transformers.AutoConfig.from_pretrained(d)
        cfg.sliding_window = WINDOW
        model = transformers.AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float64, attn_implementation="eager")
        model.eval()
        ids = torch.tensor([TOKENS])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        pm = peft.PeftModel.from_pretrained(model, os.path.join(d, "adapter"), is_trainable=True)
        pm.to(torch.float64)
        out = pm(ids).logits[0]
        golden = {"logits": logits.contiguous(), "logits_lora": out.detach().float().contiguous()}
        if fam == "gemma2":
            nll = torch.nn.functional.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
            nll.backward()
            golden["nll_lora"] = nll.detach().float().reshape(1)
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    golden[pname.replace(".default", "") + ".grad"] = p.grad.detach().float().contiguous()
        safetensors.torch.save_file(golden, os.path.join(d, "window_golden.safetensors"),
                                    metadata={"window": str(WINDOW), "torch": torch.__version__, "transformers": transformers.__version__,
                                              "peft": peft.__version__})
        # How much the window changes the logits (the test would pass vacuously otherwise).
        full = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager")
        with torch.no_grad():
            ref = full(ids).logits[0].float()
        print(fam, "window", WINDOW, "changes the logits by", float((ref - logits).abs().max() / ref.abs().max()), "relative")


if __name__ == "__main__":
    sys.exit(main())
