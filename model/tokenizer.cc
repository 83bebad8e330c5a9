#include "model/tokenizer.h"

#include <algorithm>
#include <cctype>
#include <functional>
#include <limits>
#include <queue>

#include "model/unicode.h"

namespace fedtune::model {
namespace {

constexpr int32_t kTypeNormal = 1;
constexpr int32_t kTypeControl = 3;
constexpr int32_t kTypeUserDefined = 4;
constexpr int32_t kTypeUnused = 5;
constexpr int32_t kTypeByte = 6;
constexpr const char* kSpmSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// Pre-tokenizer regexes, hand-compiled into matchers over code points. Each returns the end
// index (exclusive) of the match starting at i; alternatives are tried in regex order, as the
// leftmost-first engines (Oniguruma in HF tokenizers, llama.cpp) do.
//
// gpt2 (HF ByteLevel):  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//         | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
class Matcher {
 public:
  explicit Matcher(const std::vector<CodeUnit>& u) : u_(u), n_(u.size()) {}
  uint32_t cp(size_t i) const { return u_[i].cp; }
  bool L(size_t i) const { return i < n_ && IsLetter(cp(i)); }
  bool N(size_t i) const { return i < n_ && IsNumber(cp(i)); }
  bool S(size_t i) const { return i < n_ && IsWhitespace(cp(i)); }
  bool Other(size_t i) const { return i < n_ && !IsWhitespace(cp(i)) && !IsLetter(cp(i)) && !IsNumber(cp(i)); }
  static uint32_t Lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

  size_t Contraction(size_t i, bool ignore_case) const {
    if (cp(i) != '\'' || i + 1 >= n_) return 0;
    auto c = [&](size_t k) { return ignore_case ? Lower(cp(k)) : cp(k); };
    const uint32_t a = c(i + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n_) {
      const uint32_t b = c(i + 2);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    return 0;
  }
  size_t Run(size_t j, bool (Matcher::*pred)(size_t) const) const {
    while ((this->*pred)(j)) ++j;
    return j;
  }
  // \s+(?!\S) then \s+
  size_t Spaces(size_t i) const {
    const size_t e = Run(i, &Matcher::S);
    if (e == n_ || e - i == 1) return e;  // at end, or a single space before non-space (\s+)
    return e - 1;                         // leave one space to prefix the next word
  }
  size_t Gpt2(size_t i) const {
    if (size_t e = Contraction(i, false)) return e;
    const size_t j = cp(i) == ' ' ? i + 1 : i;
    if (L(j)) return Run(j, &Matcher::L);
    if (N(j)) return Run(j, &Matcher::N);
    if (Other(j)) return Run(j, &Matcher::Other);
    return Spaces(i);
  }
  // Llama 3's pre-tokenizer regex; Qwen2's is the same with single digits (max_digits 1).
  size_t Llama3(size_t i, size_t max_digits = 3) const {
    if (size_t e = Contraction(i, true)) return e;
    const uint32_t c0 = cp(i);
    if (c0 != '\r' && c0 != '\n' && !IsNumber(c0) && L(IsLetter(c0) ? i : i + 1)) {
      return Run(IsLetter(c0) ? i : i + 1, &Matcher::L);
    }
    if (N(i)) {
      size_t j = i;
      while (j < i + max_digits && N(j)) ++j;
      return j;
    }
    const size_t j = c0 == ' ' ? i + 1 : i;
    if (Other(j)) {
      size_t e = Run(j, &Matcher::Other);
      while (e < n_ && (cp(e) == '\r' || cp(e) == '\n')) ++e;
      return e;
    }
    // \s*[\r\n]+ : the match ends just after the last newline of the whitespace run.
    const size_t e = Run(i, &Matcher::S);
    for (size_t k = e; k > i; --k) {
      if (cp(k - 1) == '\r' || cp(k - 1) == '\n') return k;
    }
    return Spaces(i);
  }

 private:
  const std::vector<CodeUnit>& u_;
  size_t n_;
};

// GPT-2's reversible byte -> printable code point map.
void BuildByteMap(uint32_t* byte_to_cp) {
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    byte_to_cp[b] = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& g) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  FT_ASSIGN_OR_RETURN(std::string model, g.GetString("tokenizer.ggml.model"));
  if (model != "gpt2" && model != "llama") {
    return absl::UnimplementedError(absl::StrCat("tokenizer model '", model, "' is not supported (byte-level BPE 'gpt2', SentencePiece 'llama')"));
  }
  t->spm_ = model == "llama";
  const std::string pre = g.Find("tokenizer.ggml.pre") ? g.GetString("tokenizer.ggml.pre").value_or("default") : "default";
  if (t->spm_) {
    // SentencePiece splits nothing before its merges (llama.cpp writes pre "default" or none).
  } else if (pre == "smollm") {
    t->pre_ = PreTokenizer::kSmolLm;
  } else if (pre == "llama3" || pre == "llama-bpe" || pre == "llama-v3") {
    t->pre_ = PreTokenizer::kLlama3;
    t->ignore_merges_ = true;  // llama-3's tokenizer.json sets ignore_merges
  } else if (pre == "qwen2") {
    t->pre_ = PreTokenizer::kQwen2;
  } else if (pre == "default" || pre == "gpt2" || pre == "gpt-2") {
    t->pre_ = PreTokenizer::kGpt2;
  } else {
    return absl::UnimplementedError(absl::StrCat("pre-tokenizer '", pre, "' is not supported (gpt2, smollm, llama3, qwen2)"));
  }
  FT_ASSIGN_OR_RETURN(const GgufValue* toks, g.GetArray("tokenizer.ggml.tokens"));
  if (toks->array_type != GgufType::kString || toks->strings.empty()) {
    return absl::InvalidArgumentError("tokenizer.ggml.tokens must be a non-empty string array");
  }
  if (toks->strings.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("tokenizer.ggml.tokens is too large");
  }
  t->tokens_ = toks->strings;
  const int32_t n = static_cast<int32_t>(t->tokens_.size());
  t->types_.assign(t->tokens_.size(), 1);
  if (g.Find("tokenizer.ggml.token_type")) {
    FT_ASSIGN_OR_RETURN(const GgufValue* types, g.GetArray("tokenizer.ggml.token_type"));
    if (types->ints.size() != t->tokens_.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.token_type has ", types->array_size(),
                                                     " entries for ", n, " tokens"));
    }
    for (size_t i = 0; i < types->ints.size(); ++i) t->types_[i] = static_cast<int32_t>(types->ints[i]);
  }
  t->token_to_id_.reserve(t->tokens_.size());
  for (int32_t i = 0; i < n; ++i) t->token_to_id_.emplace(t->tokens_[i], i);
  if (t->spm_) FT_RETURN_IF_ERROR(t->InitSentencePiece(g));

  BuildByteMap(t->byte_to_cp_);
  for (int b = 0; b < 256; ++b) {
    t->cp_to_byte_[t->byte_to_cp_[b]] = static_cast<uint8_t>(b);
    std::string s;
    AppendUtf8(t->byte_to_cp_[b], &s);
    auto it = t->token_to_id_.find(s);
    t->byte_token_[b] = it == t->token_to_id_.end() ? -1 : it->second;
  }

  const GgufValue* merges = nullptr;
  if (!t->spm_) {
    FT_ASSIGN_OR_RETURN(merges, g.GetArray("tokenizer.ggml.merges"));
    if (merges->array_type != GgufType::kString) return absl::InvalidArgumentError("tokenizer.ggml.merges must be a string array");
    t->merges_.reserve(merges->strings.size());
  }
  for (size_t r = 0; merges != nullptr && r < merges->strings.size(); ++r) {
    const std::string& m = merges->strings[r];
    const size_t sp = m.find(' ', 1);
    if (sp == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("tokenizer merge ", r, " '", m, "' has no space"));
    const auto a = t->token_to_id_.find(m.substr(0, sp));
    const auto b = t->token_to_id_.find(m.substr(sp + 1));
    const auto ab = t->token_to_id_.find(m.substr(0, sp) + m.substr(sp + 1));
    if (a == t->token_to_id_.end() || b == t->token_to_id_.end() || ab == t->token_to_id_.end()) continue;
    const uint64_t key = (static_cast<uint64_t>(a->second) << 32) | static_cast<uint32_t>(b->second);
    t->merges_.emplace(key, Merge{static_cast<int32_t>(r), ab->second});  // first (lowest rank) wins
  }

  for (int32_t i = 0; i < n; ++i) {
    if ((t->types_[i] == kTypeControl || t->types_[i] == kTypeUserDefined) && !t->tokens_[i].empty()) t->specials_.push_back(i);
  }
  std::stable_sort(t->specials_.begin(), t->specials_.end(), [&](int32_t x, int32_t y) {
    return t->tokens_[x].size() > t->tokens_[y].size();
  });
  auto id_or = [&](const char* key, int32_t def) {
    const int64_t v = g.GetIntOr(key, def);
    return (v >= 0 && v < n) ? static_cast<int32_t>(v) : def;
  };
  t->bos_ = id_or("tokenizer.ggml.bos_token_id", -1);
  t->eos_ = id_or("tokenizer.ggml.eos_token_id", -1);
  t->eot_ = t->FindToken("<|im_end|>").value_or(t->FindToken("<|eot_id|>").value_or(-1));
  t->add_bos_ = g.Find("tokenizer.ggml.add_bos_token") ? g.GetBool("tokenizer.ggml.add_bos_token").value_or(false) : false;
  if (g.Find("tokenizer.chat_template")) {
    // SmolLM2's template injects a default system message: '<|im_start|>system\n...<|im_end|>'.
    const std::string tmpl = g.GetString("tokenizer.chat_template").value_or("");
    const std::string head = "'<|im_start|>system\n";
    const size_t p = tmpl.find(head);
    if (p != std::string::npos) {
      const size_t q = tmpl.find("<|im_end|>", p + head.size());
      if (q != std::string::npos) t->default_system_ = tmpl.substr(p + head.size(), q - p - head.size());
    }
  }
  return t;
}

std::optional<int32_t> Tokenizer::FindToken(std::string_view text) const {
  auto it = token_to_id_.find(std::string(text));
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && (types_[id] == kTypeControl || types_[id] == kTypeUserDefined);
}

bool Tokenizer::IsEndOfGeneration(int32_t id) const { return id == eos_ || id == eot_; }

void Tokenizer::SplitPieces(std::string_view text, std::vector<std::string_view>* pieces) const {
  const auto units = DecodeUtf8(text);
  Matcher m(units);
  auto emit = [&](size_t a, size_t b) {
    const size_t begin = units[a].offset;
    const size_t end = b < units.size() ? units[b].offset : text.size();
    pieces->push_back(text.substr(begin, end - begin));
  };
  size_t i = 0;
  while (i < units.size()) {
    size_t e;
    if (pre_ == PreTokenizer::kLlama3) {
      e = m.Llama3(i);
    } else if (pre_ == PreTokenizer::kQwen2) {
      e = m.Llama3(i, 1);
    } else if (pre_ == PreTokenizer::kSmolLm && m.N(i)) {
      e = i + 1;  // Digits(individual_digits=true) isolates every digit first
    } else if (pre_ == PreTokenizer::kSmolLm) {
      // Run the gpt2 regex on the span up to the next digit, as a separate piece.
      size_t stop = i;
      while (stop < units.size() && !m.N(stop)) ++stop;
      std::vector<CodeUnit> sub(units.begin() + static_cast<std::ptrdiff_t>(i), units.begin() + static_cast<std::ptrdiff_t>(stop));
      Matcher ms(sub);
      size_t k = 0;
      while (k < sub.size()) {
        const size_t ke = ms.Gpt2(k);
        emit(i + k, i + ke);
        k = ke;
      }
      i = stop;
      continue;
    } else {
      e = m.Gpt2(i);
    }
    FT_CHECK(e > i);
    emit(i, e);
    i = e;
  }
}

void Tokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* out) const {
  if (ignore_merges_) {
    std::string mapped;
    for (unsigned char c : piece) AppendUtf8(byte_to_cp_[c], &mapped);
    if (auto it = token_to_id_.find(mapped); it != token_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> sym;
  sym.reserve(piece.size());
  for (unsigned char c : piece) {
    if (byte_token_[c] >= 0) sym.push_back(byte_token_[c]);
  }
  // Repeatedly merge the lowest-rank adjacent pair (leftmost on ties), as HF's BPE does.
  while (sym.size() > 1) {
    int32_t best_rank = std::numeric_limits<int32_t>::max();
    size_t best = 0;
    int32_t result = -1;
    for (size_t k = 0; k + 1 < sym.size(); ++k) {
      const uint64_t key = (static_cast<uint64_t>(sym[k]) << 32) | static_cast<uint32_t>(sym[k + 1]);
      auto it = merges_.find(key);
      if (it != merges_.end() && it->second.rank < best_rank) {
        best_rank = it->second.rank;
        best = k;
        result = it->second.result;
      }
    }
    if (result < 0) break;
    sym[best] = result;
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  out->insert(out->end(), sym.begin(), sym.end());
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool parse_special) const {
  std::vector<int32_t> ids;
  std::vector<std::string_view> pieces;
  bool after_special = true;  // SentencePiece: the space prefix goes before text that starts the input or follows a special token
  auto encode_plain = [&](std::string_view s) {
    if (spm_) {
      EncodeSentencePiece(s, add_space_prefix_ && after_special, &ids);
      after_special = false;
      return;
    }
    pieces.clear();
    SplitPieces(s, &pieces);
    for (auto p : pieces) EncodePiece(p, &ids);
  };
  if (!parse_special || specials_.empty()) {
    encode_plain(text);
    return ids;
  }
  size_t start = 0, i = 0;
  while (i < text.size()) {
    int32_t hit = -1;
    for (int32_t id : specials_) {  // longest first, so the leftmost-longest token wins
      const std::string& s = tokens_[id];
      if (text.compare(i, s.size(), s) == 0) {
        hit = id;
        break;
      }
    }
    if (hit < 0) {
      ++i;
      continue;
    }
    if (i > start) encode_plain(text.substr(start, i - start));
    ids.push_back(hit);
    after_special = true;
    i += tokens_[hit].size();
    start = i;
  }
  if (start < text.size()) encode_plain(text.substr(start));
  return ids;
}

std::vector<int32_t> Tokenizer::EncodeWithBos(std::string_view text, bool parse_special) const {
  std::vector<int32_t> ids;
  if (add_bos_ && bos_ >= 0) ids.push_back(bos_);
  auto rest = Encode(text, parse_special);
  ids.insert(ids.end(), rest.begin(), rest.end());
  return ids;
}

std::string Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  if (IsSpecial(id)) return tokens_[id];
  if (spm_) {
    const std::string& t = tokens_[id];
    if (types_[id] == kTypeByte && t.size() == 6) return std::string(1, static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
    std::string out;
    for (size_t i = 0; i < t.size();) {
      if (t.compare(i, 3, kSpmSpace) == 0) {
        out.push_back(' ');
        i += 3;
      } else {
        out.push_back(t[i++]);
      }
    }
    return out;
  }
  std::string out;
  for (const CodeUnit& u : DecodeUtf8(tokens_[id])) {
    auto it = cp_to_byte_.find(u.cp);
    if (it != cp_to_byte_.end()) out.push_back(static_cast<char>(it->second));
    else out.append(tokens_[id], u.offset, u.len);
  }
  return out;
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  bool first_text = true;
  for (int32_t id : ids) {
    if (skip_special && IsSpecial(id)) continue;
    std::string b = TokenBytes(id);
    // SentencePiece: the space prefix of the first piece of text is not part of the text.
    if (spm_ && add_space_prefix_ && first_text && !IsSpecial(id) && !b.empty() && b[0] == ' ') b.erase(0, 1);
    if (!IsSpecial(id)) first_text = false;
    out += b;
  }
  return out;
}

absl::Status Tokenizer::InitSentencePiece(const GgufFile& g) {
  FT_ASSIGN_OR_RETURN(const GgufValue* scores, g.GetArray("tokenizer.ggml.scores"));
  if (scores->floats.size() != tokens_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.scores has ", scores->array_size(), " entries for ", tokens_.size(), " tokens"));
  }
  scores_.assign(scores->floats.begin(), scores->floats.end());
  add_space_prefix_ = g.Find("tokenizer.ggml.add_space_prefix") ? g.GetBool("tokenizer.ggml.add_space_prefix").value_or(true) : true;
  const int64_t unk = g.GetIntOr("tokenizer.ggml.unknown_token_id", -1);
  unk_ = unk >= 0 && unk < vocab_size() ? static_cast<int32_t>(unk) : FindToken("<unk>").value_or(-1);
  std::fill(std::begin(byte_fallback_), std::end(byte_fallback_), -1);
  for (int32_t i = 0; i < vocab_size(); ++i) {
    const std::string& t = tokens_[static_cast<size_t>(i)];
    if (types_[static_cast<size_t>(i)] == kTypeByte && t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
        std::isxdigit(static_cast<unsigned char>(t[3])) && std::isxdigit(static_cast<unsigned char>(t[4]))) {
      byte_fallback_[std::stoi(t.substr(3, 2), nullptr, 16)] = i;
    }
  }
  return absl::OkStatus();
}

int32_t Tokenizer::SpmPiece(std::string_view piece) const {
  auto it = token_to_id_.find(std::string(piece));
  if (it == token_to_id_.end()) return -1;
  const int32_t type = types_[static_cast<size_t>(it->second)];
  return type == kTypeNormal || type == kTypeUserDefined || type == kTypeUnused ? it->second : -1;
}

void Tokenizer::EncodeSentencePiece(std::string_view text, bool prefix, std::vector<int32_t>* out) const {
  std::string s = prefix ? std::string(kSpmSpace) : std::string();
  for (char ch : text) {
    if (ch == ' ') s += kSpmSpace;
    else s.push_back(ch);
  }
  // Symbols: the UTF-8 characters, in a linked list; merges of adjacent pairs whose text is a
  // piece, highest score first (leftmost on ties), as SentencePiece's BPE model.
  struct Sym {
    size_t begin, len;
    int prev, next;
  };
  std::vector<Sym> sym;
  for (const CodeUnit& u : DecodeUtf8(s)) sym.push_back({u.offset, u.len, static_cast<int>(sym.size()) - 1, static_cast<int>(sym.size()) + 1});
  if (sym.empty()) return;
  sym.back().next = -1;
  struct Pair {
    float score;
    int left, right;
    size_t len;  // text length when queued (stale if a side changed since)
    bool operator<(const Pair& o) const { return score < o.score || (score == o.score && left > o.left); }
  };
  std::priority_queue<Pair> agenda;
  std::unordered_map<std::string, std::pair<std::string, std::string>> rev_merge;  // unused pieces: resegmented
  auto add_pair = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const std::string_view piece(s.data() + sym[static_cast<size_t>(l)].begin, sym[static_cast<size_t>(l)].len + sym[static_cast<size_t>(r)].len);
    const int32_t id = SpmPiece(piece);
    if (id < 0) return;
    agenda.push({scores_[static_cast<size_t>(id)], l, r, piece.size()});
    if (types_[static_cast<size_t>(id)] == kTypeUnused) {
      rev_merge[std::string(piece)] = {s.substr(sym[static_cast<size_t>(l)].begin, sym[static_cast<size_t>(l)].len),
                                       s.substr(sym[static_cast<size_t>(r)].begin, sym[static_cast<size_t>(r)].len)};
    }
  };
  for (size_t i = 1; i < sym.size(); ++i) add_pair(static_cast<int>(i) - 1, static_cast<int>(i));
  while (!agenda.empty()) {
    const Pair p = agenda.top();
    agenda.pop();
    Sym& l = sym[static_cast<size_t>(p.left)];
    Sym& r = sym[static_cast<size_t>(p.right)];
    if (l.len == 0 || r.len == 0 || l.len + r.len != p.len || l.next != p.right) continue;  // stale
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[static_cast<size_t>(r.next)].prev = p.left;
    add_pair(l.prev, p.left);
    add_pair(p.left, l.next);
  }
  std::function<void(const std::string&)> emit = [&](const std::string& piece) {
    const int32_t id = SpmPiece(piece);
    if (id >= 0 && types_[static_cast<size_t>(id)] != kTypeUnused) {
      out->push_back(id);
      return;
    }
    if (auto it = rev_merge.find(piece); it != rev_merge.end()) {
      emit(it->second.first);
      emit(it->second.second);
      return;
    }
    // Byte fallback; a vocabulary without byte pieces gets its unknown token (SentencePiece's
    // behaviour), and one without either loses the piece, as SentencePiece would not encode it.
    const bool bytes = std::all_of(piece.begin(), piece.end(), [&](char ch) { return byte_fallback_[static_cast<unsigned char>(ch)] >= 0; });
    if (bytes) {
      for (unsigned char b : piece) out->push_back(byte_fallback_[b]);
    } else if (unk_ >= 0) {
      out->push_back(unk_);
    }
  };
  for (int i = 0; i >= 0; i = sym[static_cast<size_t>(i)].next) emit(s.substr(sym[static_cast<size_t>(i)].begin, sym[static_cast<size_t>(i)].len));
}

std::string Tokenizer::FormatChat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  std::string out;
  if (!default_system_.empty() && (messages.empty() || messages[0].role != "system")) {
    out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
  }
  for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace fedtune::model
