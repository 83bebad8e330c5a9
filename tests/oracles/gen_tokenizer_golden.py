#!/usr/bin/env python3
"""Golden token ids for fedtune's tokenizer from Hugging Face `tokenizers` (Rust), built from the
GGUF vocabulary and merges with SmolLM2's own pre-tokenizer configuration (tokenizer.json:
Digits(individual_digits) then ByteLevel(add_prefix_space=False); special tokens = the GGUF's
control tokens). Cross-checked against llama.cpp (llama-cpp-python, vocab only) when installed.

Writes tests/data/tokenizer_golden.jsonl: first line {"meta": ...}, then {"text", "ids"}.
"""
import json, random, sys, unicodedata
import gguf
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

def load_vocab(path):
    r = gguf.GGUFReader(path)
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    return toks, types, merges

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

def build_hf(toks, types, merges, mode="smollm"):
    """mode: smollm (SmolLM2's tokenizer.json), gpt2 (ByteLevel regex only) or llama3 (Llama-3's
    tokenizer.json: Split on its regex, ByteLevel without regex, ignore_merges)."""
    vocab = {t: i for i, t in enumerate(toks)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=(mode == "llama3"))
    tk = Tokenizer(bpe)
    if mode == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    elif mode == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(toks, types) if ty in (3, 4)])
    return tk

WORDS = ("the of and to in is that for it as with was on be by this are or his from at which but have "
         "not an they you were her all she there would their we him been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may "
         "then do first any my now such like our over man me even most made after also did many before "
         "must through back years where much your way well down should because each just those people "
         "Mr how too little state good very make world still own see men work long get here between both "
         "life being under never day same another know while last might us great old year off come since "
         "against go came right used take three Copyright Software License GNU Free Foundation").split()
SCRIPTS = ["Ελληνικά κείμενο", "Русский текст, ёжик", "العربية نص ٣٤٥", "עברית טקסט", "हिन्दी पाठ १२३",
           "ภาษาไทย", "中文文本，你好世界", "日本語のテキスト、カタカナ", "한국어 텍스트", "Tiếng Việt có dấu",
           "Ünïcödé façade naïve café", "ﬁ ﬂ ligatures", "Ⅻ ⅳ roman", "½ ¾ ² ³ superscripts", "１２３ ＡＢＣ fullwidth",
           "e\u0301 a\u0308 combining", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "Ω≈ç√∫˜µ≤≥÷", "Zalgo z̷̢a̴l̶g̸o", "🙂 🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️"]
CODE = ["def f(x):\n    return x**2 + 1  # square\n", "int main() { std::vector<int> v{1,2,3}; return v[0]; }",
        '{"key": [1, 2.5, -3e10], "nested": {"a": null}}', "<div class=\"x\">&amp; &lt;tag&gt;</div>",
        "for (i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}", "SELECT * FROM t WHERE id = 42;",
        "    indented\n        more\n\t\ttabs", "x = y if z else w  # trailing   ", "$ ls -la | grep '^d'"]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<filename>"]
WS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2003", " \t \n", "\n \n"]
CONTRACTIONS = ["I'm", "you're", "they've", "we'll", "he'd", "it's", "don't", "DON'T", "It'S", "'s", "o'clock", "rock'n'roll"]

def assigned_random_char(rng):
    while True:
        cp = rng.choice([rng.randrange(0x20, 0x250), rng.randrange(0x250, 0x3000),
                         rng.randrange(0x3000, 0xA000), rng.randrange(0xAC00, 0xD7A4), rng.randrange(0x1F300, 0x1FA00)])
        cat = unicodedata.category(chr(cp))
        if cat not in ("Cn", "Cs", "Co", "Cc"):
            return chr(cp)

def number(rng):
    k = rng.randrange(6)
    if k == 0: return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if k == 1: return f"{rng.random() * 1000:.{rng.randrange(1, 6)}f}"
    if k == 2: return f"{rng.randrange(10**6):,}"
    if k == 3: return f"+1 ({rng.randrange(100, 999)}) {rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}"
    if k == 4: return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    return f"v{rng.randrange(10)}.{rng.randrange(20)}.{rng.randrange(100)}"

def make_corpus(n, license_lines, rng):
    out = []
    out += license_lines[:400]
    gens = [
        lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 15))),
        lambda: rng.choice(SCRIPTS) + rng.choice(WS) + rng.choice(WORDS),
        lambda: rng.choice(CODE),
        lambda: rng.choice(WS).join([rng.choice(WORDS), number(rng), rng.choice(WORDS)]),
        lambda: "".join(rng.choice(WS) for _ in range(rng.randrange(1, 6))) + rng.choice(WORDS) + "".join(rng.choice(WS) for _ in range(rng.randrange(0, 4))),
        lambda: " ".join(rng.choice(CONTRACTIONS) for _ in range(rng.randrange(1, 5))),
        lambda: rng.choice(SPECIAL) + rng.choice(["user", "assistant", "system"]) + "\n" + " ".join(rng.choice(WORDS) for _ in range(4)) + rng.choice(SPECIAL),
        lambda: "".join(assigned_random_char(rng) for _ in range(rng.randrange(1, 12))),
        lambda: "".join(rng.choice("!@#$%^&*()_+-=[]{};:'\",.<>/?\\|`~ ") for _ in range(rng.randrange(1, 20))),
        lambda: number(rng) + rng.choice(["", " ", "%", "px", " km", "th"]),
        lambda: rng.choice(license_lines) + rng.choice(WS) + rng.choice(SCRIPTS),
        lambda: "".join(rng.choice(SCRIPTS + WORDS + CONTRACTIONS + SPECIAL) + rng.choice(WS + ["", ""]) for _ in range(rng.randrange(2, 8))),
    ]
    while len(out) < n:
        out.append(rng.choice(gens)())
    return out

def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    toks, types, merges = load_vocab(model)
    tk = build_hf(toks, types, merges)
    rng = random.Random(20261123)
    lic = []
    for name in ["GPL-3", "Apache-2.0", "Artistic", "MPL-2.0", "LGPL-2.1"]:
        try:
            lic += [l for l in open(f"/usr/share/common-licenses/{name}", encoding="utf-8").read().split("\n") if l.strip()]
        except FileNotFoundError:
            pass
    rng.shuffle(lic)
    corpus = make_corpus(2400, lic, rng)
    # The SmolLM2 vocabulary also exercises the gpt2 and llama-3 pre-tokenizers (fedtune selects
    # them by tokenizer.ggml.pre); ids_gpt2 / ids_llama3 come from the matching HF configurations.
    tk_gpt2 = build_hf(toks, types, merges, "gpt2")
    tk_llama3 = build_hf(toks, types, merges, "llama3")
    rows = [{"text": t, "ids": tk.encode(t).ids, "ids_gpt2": tk_gpt2.encode(t).ids, "ids_llama3": tk_llama3.encode(t).ids}
            for t in corpus]
    meta = {"oracle": f"tokenizers {tokenizers.__version__}", "model": model.split("/")[-1], "n": len(rows)}
    try:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
        agree = sum(llm.tokenize(r["text"].encode(), add_bos=False, special=True) == r["ids"] for r in rows)
        meta["llama_cpp_agreement"] = f"{agree}/{len(rows)} (llama-cpp-python {llama_cpp.__version__})"
    except ImportError:
        pass
    with open("tests/data/tokenizer_golden.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta}, ensure_ascii=False) + "\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(meta)

if __name__ == "__main__":
    main()
