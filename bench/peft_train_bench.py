#!/usr/bin/env python3
"""PyTorch + PEFT with the protocol of bench/bench_train.cc: SmolLM2 from the same GGUF
(transformers dequantizes it to fp32), LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, random
tokens, batch x seq, AdamW, tokens/s over timed steps after one warm-up, peak RSS (and peak
GPU memory allocated by PyTorch with --device cuda).
  peft_train_bench.py MODEL.gguf [--seq 256 --batch 8 --steps 3 --threads 2 --bf16 --device cuda]"""
import argparse, os, random, resource, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", default="", help="FIRST-LAST: adapters on these layers only (PEFT layers_to_transform), as bench_train --layers")
    a = ap.parse_args()
    import torch, transformers, peft
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.model))
    base = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    layers = None
    if a.layers:
        first, last = (int(x) for x in a.layers.split("-"))
        layers = list(range(first, last + 1))
    cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          lora_dropout=0.0, task_type="CAUSAL_LM", layers_to_transform=layers)
    model = peft.get_peft_model(base, cfg).to(a.device)
    model.train()
    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = random.Random(1)
    ids = torch.tensor([[rng.randrange(17, base.config.vocab_size) for _ in range(a.seq)] for _ in range(a.batch)]).to(a.device)
    total = 0.0
    for s in range(a.steps + 1):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        dt = time.perf_counter() - t0
        if s:
            total += dt
        print(f"step {s}: {dt:.2f} s", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mode = ("bf16 autocast" if a.bf16 else "fp32") + (f", {torch.cuda.get_device_name()}" if cuda else "")
    gpu = f", GPU {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if cuda else ""
    print(f"| PyTorch {torch.__version__} + PEFT {peft.__version__} ({mode}) | lora r={a.rank} on {a.layers or 'all'} | {a.batch} x {a.seq} | {a.threads} | "
          f"{a.batch * a.seq * a.steps / total:.1f} | {rss:.0f} MiB{gpu} |")

if __name__ == "__main__":
    main()
