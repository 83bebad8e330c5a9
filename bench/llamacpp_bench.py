#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) with the same protocol as bench/bench_inference.cc:
pp = one batch of PP random tokens, tg = TG tokens one at a time after a 1-token prompt,
tokens/s over REPS runs after a warm-up, and peak RSS of this process.
Usage: llamacpp_bench.py MODEL [--pp 512 --tg 128 --reps 3 --threads 2]"""
import argparse, random, resource, statistics, time
import llama_cpp

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.pp + a.tg + 1, n_batch=a.pp, n_ubatch=a.pp,
                          n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    rng = random.Random(1)
    prompt = [rng.randrange(17, llm.n_vocab()) for _ in range(a.pp)]
    pp_rates, tg_rates = [], []
    for r in range(a.reps + 1):
        llm.reset()
        t0 = time.perf_counter(); llm.eval(prompt); s = time.perf_counter() - t0
        if r: pp_rates.append(a.pp / s)
        llm.reset()
        llm.eval([prompt[0]])
        t1 = time.perf_counter()
        for i in range(a.tg):
            # Without logits_all, llama-cpp-python does not fill `scores`; the token fed back
            # does not change the cost of a step, so feed the prompt tokens in order.
            llm.eval([prompt[(i + 1) % a.pp]])
        s2 = time.perf_counter() - t1
        if r: tg_rates.append(a.tg / s2)
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    tag = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    print(f"| {tag} | {a.threads} | pp{a.pp} | {statistics.mean(pp_rates):.1f} ± {sd(pp_rates):.1f} |")
    print(f"| {tag} | {a.threads} | tg{a.tg} | {statistics.mean(tg_rates):.1f} ± {sd(tg_rates):.1f} |")
    print(f"| llama.cpp | peak RSS | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (includes the Python interpreter) |")

if __name__ == "__main__":
    main()
