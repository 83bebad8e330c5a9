#!/usr/bin/env bash
# The GPU training table (issue 4, criterion 3): fedtune's CUDA backend with bf16 and TF32
# products, then PyTorch + PEFT with bf16 autocast on the same GPU, model, batch and sequence
# length, one after the other in one session. Peak GPU memory: what fedtune's backend allocated
# (PeakDeviceBytes) and torch.cuda.max_memory_allocated.
#   bench/run_gpu_table.sh [MODEL] [EXTRA bench_train ARGS...]   (after scripts/setup.sh --oracles
#   and a build with nvcc, on a machine with an NVIDIA GPU; PyTorch must have CUDA)
# Not yet run: the machines this project was built on have no GPU (README, "Not done yet").
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
model="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
b=(build/bench/bench_train "$model" --device cuda --adapter lora --rank 16 --seq 256 --batch 8 --steps 5 "$@")
FEDTUNE_CUDA_GEMM=bf16 "${b[@]}" --no-recompute 2>/dev/null
FEDTUNE_CUDA_GEMM=tf32 "${b[@]}" --no-recompute 2>/dev/null
FEDTUNE_CUDA_GEMM=bf16 "${b[@]}" 2>/dev/null
py="${FEDTUNE_ORACLES:-$HOME/.cache/fedtune-oracles}/bin/python"
"$py" bench/peft_train_bench.py "$model" --device cuda --bf16 --steps 5 2>&1 | tail -1
"$py" bench/peft_train_bench.py "$model" --device cuda --steps 5 2>&1 | tail -1
