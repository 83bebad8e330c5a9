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
  tokenizer.json, tokenizer_config.json
                                   a byte-level BPE vocabulary of 320 tokens trained by Hugging
                                   Face `tokenizers` on /usr/share/common-licenses, with the
                                   family's pre-tokenizer (Llama 3, Qwen2 rules); mistral:
                                   tokenizer.model, a 512-piece SentencePiece BPE model trained
                                   by `sentencepiece` (byte fallback, as Mistral's and Llama 2's)
  tokenizer_golden.bin, tokenizer_edge_cases.json
                                   ids of 10,000 Debian text lines (hashed) and of Unicode edge
                                   cases by the family's tokenizer library
  model.q8_0.gguf                  the folder converted by llama.cpp's own convert_hf_to_gguf.py
                                   (from the llama-cpp-python source distribution) to Q8_0
  llamacpp.safetensors             llama.cpp's logits (llama-cpp-python) for "tokens" on an F32
                                   conversion ("logits_f32") and on model.q8_0.gguf ("logits_q8_0",
                                   stored as F16)
  versions.json                    the versions that made them

Run from the repository root in the oracle venv:
  ~/.cache/fedtune-oracles/bin/python tests/oracles/gen_family_golden.py LLAMA_CPP_DIR [FAMILY ...]
where LLAMA_CPP_DIR is vendor/llama.cpp of an unpacked llama-cpp-python sdist of the installed
version (pip download --no-deps --no-binary :all: llama-cpp-python==VERSION). Without FAMILY
every family is made again; the families up to phi3 draw from one random stream seeded 0 (in
FAMILIES' order), the later ones each from their own seed (SEEDS), so that adding a family
leaves the committed goldens of the others as they are.
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

VOCAB = 320
OUT = os.path.join(os.path.dirname(__file__), "..", "data", "families")
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
              hidden_act="silu", initializer_range=0.2)

# llama.cpp's names for the pre-tokenizers (tokenizer.ggml.pre); the converter recognises
# released tokenizers by a hash, so for these home-made ones it is told the name.
PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "mistral": "default", "gemma3": "default", "phi3": "default",
       "gemma2": "default"}
SPM = ("mistral", "gemma2", "gemma3", "phi3")  # SentencePiece vocabularies
SEEDS = {"gemma2": 2}  # families added after the first six: their own random streams
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")


SPM_VOCAB = 512


def make_sentencepiece(d, dummy_prefix=True):
    """Mistral / Llama 2 style: a SentencePiece BPE model (tokenizer.model) trained by the
    sentencepiece package with those models' settings: byte fallback, digits split, no
    normalisation, whitespace kept, <unk> <s> </s> = 0 1 2. Gemma's: no dummy prefix."""
    import glob
    import sentencepiece as spm
    files = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(f))
    spm.SentencePieceTrainer.train(input=",".join(files), model_prefix=os.path.join(d, "tokenizer"), vocab_size=SPM_VOCAB,
                                   model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, add_dummy_prefix=dummy_prefix)
    os.remove(os.path.join(d, "tokenizer.vocab"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "add_bos_token": True, "model_max_length": 256}, f, indent=1)
    return SPM_VOCAB


def make_tokenizer(family, d):
    """A byte-level BPE vocabulary with the family's pre-tokenizer, saved as tokenizer.json
    (mistral: SentencePiece, make_sentencepiece)."""
    if family == "gemma2":  # Gemma's vocabulary, gemma3's file (its tokenizer goldens apply)
        for f in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(os.path.join(OUT, "gemma3", f), os.path.join(d, f))
        return SPM_VOCAB
    if family in SPM:
        return make_sentencepiece(d, dummy_prefix=family != "gemma3")
    import glob
    from tokenizers import Tokenizer, Regex, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    if family in ("llama3", "qwen2", "qwen3"):
        regex = LLAMA3_RE if family == "llama3" else QWEN2_RE
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(f))
    tok.train(files, trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "bos_token": "<|endoftext|>", "model_max_length": 256}, f, indent=1)
    return tok.get_vocab_size()


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def tokenizer_corpus():
    """The lines tests/model/family_test.cc reads too: ASCII, non-empty, first occurrences, from
    the regular files of /usr/share/common-licenses (base-files) and the top-level modules of
    /usr/lib/python3.*/ (python3's standard library), paths in byte order; at most 10,000."""
    import glob
    paths = sorted(p for p in glob.glob("/usr/share/common-licenses/*") + glob.glob("/usr/lib/python3.*/*.py")
                   if os.path.isfile(p) and not os.path.islink(p))
    seen, out = set(), []
    for p in paths:
        for line in open(p, "rb").read().split(b"\n"):
            if not line or any(c >= 0x80 for c in line) or line in seen:
                continue
            seen.add(line)
            out.append(line.decode("ascii"))
            if len(out) == 10000:
                return out
    return out


def edge_cases():
    raw = open(os.path.join(OUT, "tokenizer_edge_cases.txt"), "rb").read().decode("utf-8").split("\n")
    return [l.replace("\\n", "\n") for l in raw if l]


def tokenizer_golden(d):
    """tokenizer_golden.bin: "FTT2", u32 n, u32 FNV-1a of the corpus (its lines joined by "\\n"),
    then per line u32 FNV-1a of its ids as int32 LE, over tokenizer_corpus();
    tokenizer_edge_cases.json: the ids of each edge case. Ids from Hugging Face tokenizers
    (tokenizer.json) or sentencepiece (tokenizer.model)."""
    import struct
    if os.path.exists(os.path.join(d, "tokenizer.model")):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
        encode = lambda text: sp.encode(text)
    else:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    lines = tokenizer_corpus()
    blob = bytearray(b"FTT2" + struct.pack("<II", len(lines), fnv1a32("\n".join(lines).encode())))
    for l in lines:
        ids = encode(l)
        blob += struct.pack("<I", fnv1a32(struct.pack(f"<{len(ids)}i", *ids)))
    open(os.path.join(d, "tokenizer_golden.bin"), "wb").write(bytes(blob))
    with open(os.path.join(d, "tokenizer_edge_cases.json"), "w") as f:
        json.dump([encode(l) for l in edge_cases()], f)
    return len(lines)


def convert(llama_cpp, family, d, outtype, outfile):
    """llama.cpp's converter on folder d, told the pre-tokenizer's name (see PRE)."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/gguf-py');"
            "import conversion.base as b; pre = sys.argv[2]; b.TextModel.get_vocab_base_pre = lambda self, t: pre;"
            "import convert_hf_to_gguf as c; sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[3:]; c.main()")
    # --model-name: llama.cpp special-cases vocabularies by model name ("phi3" expects
    # Phi-3's own special tokens, which these small vocabularies lack).
    subprocess.run([sys.executable, "-c", code, llama_cpp, PRE[family], d, "--outtype", outtype, "--outfile", outfile,
                    "--model-name", "fedtune tiny test model"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def llama_cpp_logits(path, tokens):
    import llama_cpp
    # F32 K/V cache (llama.cpp's default F16 cache would round keys and values).
    m = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    m.eval(tokens)
    return torch.tensor(m.scores[: len(tokens)], dtype=torch.float32).contiguous()


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
    # Gemma 3 (text): GeGLU, sqrt(hidden) embedding scale, (1 + w) norms around both blocks, q/k
    # norms, head size 16 (q 64 wide on a 32 model), 6 layers = 5 local (sliding window 128, RoPE
    # base 1e4) + 1 global (base 1e6, linear scaling x2). query_pre_attn_scalar = head size, the
    # scale llama.cpp uses for every size but 27B.
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=16, num_hidden_layers=6, sliding_window=128, query_pre_attn_scalar=16,
               tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
    # Phi-3: fused qkv_proj and gate_up_proj (PEFT adapts the fused tensors), SentencePiece.
    "phi3": (transformers.Phi3Config, dict(sliding_window=128, tie_word_embeddings=False, pad_token_id=0,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "original_max_position_embeddings": 256})),
}
# Gemma 2: gemma3's layers without q/k norms, a local (window 128) and a global layer
# alternating with one RoPE base, and soft-capping of the attention scores and the final
# logits. The caps are small (1.5 and 2.5, Google's models: 50 and 30) so that the tanh is
# far from linear on this tiny model's scores and logits.
FAMILIES["gemma2"] = (transformers.Gemma2Config, dict(head_dim=16, num_hidden_layers=2, sliding_window=128, query_pre_attn_scalar=16,
           tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=1.5,
           final_logit_softcapping=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
# PEFT target modules per family (Phi-3's projections are fused).
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
TOKENS = [1, 17, 42, 5, 88, 23, 64, 9, 31, 295, 140, 311]


def main():
    if len(sys.argv) < 2 or any(f not in FAMILIES for f in sys.argv[2:]):
        sys.exit(__doc__)
    llama_cpp_dir = os.path.abspath(sys.argv[1])
    only = set(sys.argv[2:]) or set(FAMILIES)
    shared = {f for f in FAMILIES if f not in SEEDS}
    if only & shared and not shared <= only:
        sys.exit("the families of the shared random stream (" + ", ".join(sorted(shared)) + ") are made together")
    import llama_cpp
    torch.manual_seed(0)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": getattr(safetensors, "__version__", "?"),
                "llama_cpp_python": llama_cpp.__version__, "tokenizers": __import__("tokenizers").__version__}
    for name, (cfg_cls, extra) in FAMILIES.items():
        if name in SEEDS:
            torch.manual_seed(SEEDS[name])
        if name not in only:
            continue
        d = os.path.join(OUT, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        vocab = make_tokenizer(name, d)
        if name not in ("qwen3", "phi3", "gemma2"):  # qwen3's vocabulary is qwen2's, phi3's mistral's (same training), gemma2's gemma3's
            print(name, "tokenizer corpus lines", tokenizer_golden(d))
        spm_vocab = name in SPM
        kw = dict(COMMON, vocab_size=vocab, **extra)
        if "hidden_activation" in kw:
            del kw["hidden_act"]
        cfg = cfg_cls(**kw, bos_token_id=1 if spm_vocab else 0, eos_token_id=2 if spm_vocab else 0)
        # Eager attention: the attention soft-capping (gemma2) is not in PyTorch's SDPA.
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation="eager")
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
        # Goldens in float64 (the F16-exact weights, computed without fp32 rounding), so that
        # fedtune's fp32 is compared with the function, not with PyTorch's own fp32 error.
        model64 = copy.deepcopy(model).double()
        with torch.no_grad():
            logits = model64(ids).logits[0].float()
        base_model = copy.deepcopy(model)  # fp32, for the llama.cpp GELU comparison below
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                               target_modules=PEFT_TARGETS.get(name, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        pm = peft.get_peft_model(model64, lcfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_((0.3 * torch.randn(p.shape)).double())  # fp32-representable values
        out = pm(ids).logits[0]
        nll = torch.nn.functional.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
        nll.backward()
        golden = {"tokens": torch.tensor(TOKENS, dtype=torch.int32), "logits": logits.contiguous(),
                  "logits_lora": out.detach().float().contiguous(), "nll_lora": nll.detach().float().reshape(1)}
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                # PEFT's saved name: drop the adapter name ("lora_A.default.weight" -> "lora_A.weight").
                golden[pname.replace(".default", "") + ".grad"] = p.grad.detach().float().contiguous()
        pm.to(torch.float32)
        pm.save_pretrained(os.path.join(d, "adapter"))
        safetensors.torch.save_file(golden, os.path.join(d, "golden.safetensors"))
        # llama.cpp: the F32 conversion (exact arithmetic, not kept) and the committed Q8_0 one.
        f32 = os.path.join("/tmp", f"fedtune_{name}_f32.gguf")
        convert(llama_cpp_dir, name, d, "f32", f32)
        convert(llama_cpp_dir, name, d, "q8_0", os.path.join(d, "model.q8_0.gguf"))
        lc = {"logits_f32": llama_cpp_logits(f32, TOKENS),
              # F16 is enough for the Q8_0 comparison (llama.cpp rounds activations to 8 bits there).
              "logits_q8_0": llama_cpp_logits(os.path.join(d, "model.q8_0.gguf"), TOKENS).half()}
        if name in ("gemma2", "gemma3"):
            # Where llama.cpp differs from transformers on Gemma 3, and why: its converter adds
            # Gemma's +1 to the norm weights in the checkpoint's dtype (F16 here, BF16 in Google's
            # files), and ggml computes GELU from a table of fp16 values (GGML_GELU_FP16). With
            # both emulated in transformers, llama.cpp's F32 logits are reproduced.
            class GeluFp16Table(torch.nn.Module):
                def forward(self, x):
                    y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
                    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))
            emu = base_model
            with torch.no_grad():
                for pname, p in emu.named_parameters():
                    if pname.endswith("norm.weight"):
                        p.copy_((1 + p.half()).float() - 1)
            for layer in emu.model.layers:
                layer.mlp.act_fn = GeluFp16Table()
            with torch.no_grad():
                emu_logits = emu(ids).logits[0].float()
            lc["emulated_vs_llamacpp"] = ((emu_logits - lc["logits_f32"]).abs().max() / emu_logits.abs().max()).reshape(1)
            print(name, "transformers with the converter's F16 norms and ggml's fp16 GELU vs llama.cpp F32, rel",
                  float(lc["emulated_vs_llamacpp"]))
        os.remove(f32)
        safetensors.torch.save_file(lc, os.path.join(d, "llamacpp.safetensors"))
        print(name, "llama.cpp f32 vs transformers max |diff|", float((lc["logits_f32"] - logits).abs().max()))
        for extra in ("generation_config.json", os.path.join("adapter", "README.md")):
            if os.path.exists(os.path.join(d, extra)):
                os.remove(os.path.join(d, extra))
        with open(os.path.join(d, "versions.json"), "w") as f:
            json.dump(versions, f, indent=1)
        print(name, "nll", float(nll), "logit scale", float(logits.abs().max()))


if __name__ == "__main__":
    sys.exit(main())
