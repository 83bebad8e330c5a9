#include "model/text_sources.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

#include "common/mapped_file.h"
#include "common/rng.h"
#include "model/unicode.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

namespace fs = std::filesystem;

std::string Root() {
  const char* r = std::getenv("FEDTUNE_TEXT_ROOT");
  return r && *r ? r : "/usr/share";
}

absl::Status Missing(const std::string& path, const std::string& package) {
  return absl::NotFoundError(absl::StrCat(path, " not found: install the Debian package ", package, " (scripts/setup.sh does)"));
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& package) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return Missing(path, package);
  return ReadFileToString(path);
}

// A dictzip file is a gzip file (with a random-access table in its header): read it whole.
absl::StatusOr<std::string> ReadGzip(const std::string& path, const std::string& package) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return Missing(path, package);
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) return absl::InternalError(absl::StrCat("cannot open ", path));
  std::string out;
  char buf[1 << 16];
  int got = 0;
  while ((got = gzread(f, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(got));
  int err = 0;
  const char* msg = gzerror(f, &err);
  const std::string why = err != Z_OK && err != Z_STREAM_END ? msg : "";
  gzclose(f);
  if (got < 0 || !why.empty()) return absl::DataLossError(absl::StrCat(path, ": corrupt compressed data: ", why));
  return out;
}

std::string CollapseSpace(absl::string_view s) {
  std::string out;
  bool space = false;
  for (char c : s) {
    if (c == '\n' || c == '\t' || c == '\r' || c == ' ') {
      space = !out.empty();
      continue;
    }
    if (space) out += ' ';
    space = false;
    out += c;
  }
  return out;
}

std::string WithoutBraces(absl::string_view s) {
  std::string out;
  for (char c : s)
    if (c != '{' && c != '}') out += c;
  return out;
}

// At most max_chars: whole sentences ("." or ";" followed by a space) when the text is longer;
// empty when even the first sentence is too long.
std::string FirstSentences(const std::string& s, size_t max_chars) {
  if (s.size() <= max_chars) return s;
  size_t best = std::string::npos;
  for (size_t i = 0; i + 1 < s.size() && i < max_chars; ++i)
    if ((s[i] == '.' || s[i] == ';') && s[i + 1] == ' ') best = i;
  if (best == std::string::npos) return "";
  std::string out = s.substr(0, best + 1);
  if (out.back() == ';') out.back() = '.';
  return out;
}

bool IsPlainWord(const std::string& w) {
  if (w.empty() || w.size() > 24) return false;
  for (char c : w)
    if (!std::islower(static_cast<unsigned char>(c))) return false;
  return true;
}

// Index after the bracket group that opens at s[i] (same kind, nested), or npos.
size_t SkipGroup(const std::string& s, size_t i, char open, char close) {
  int depth = 0;
  for (; i < s.size(); ++i) {
    if (s[i] == open) ++depth;
    if (s[i] == close && --depth == 0) return i + 1;
  }
  return std::string::npos;
}

struct DictdEntry {
  std::string headword, body;
};

// Entries of /usr/share/dictd/<name>.{index,dict.dz}, in index order; the 00-database-* entries
// (the dictionary's own description) left out.
absl::StatusOr<std::vector<DictdEntry>> ReadDictd(const std::string& name, const std::string& package) {
  const std::string base = Root() + "/dictd/" + name;
  FT_ASSIGN_OR_RETURN(std::string index, ReadFile(base + ".index", package));
  FT_ASSIGN_OR_RETURN(std::string dict, ReadGzip(base + ".dict.dz", package));
  std::vector<DictdEntry> out;
  for (absl::string_view line : absl::StrSplit(index, '\n')) {
    const std::vector<absl::string_view> f = absl::StrSplit(line, '\t');
    if (f.size() < 3 || absl::StartsWith(f[0], "00")) continue;
    const int64_t off = DictdNumber(std::string(f[1])), len = DictdNumber(std::string(f[2]));
    if (off < 0 || len < 0 || off + len > static_cast<int64_t>(dict.size()))
      return absl::DataLossError(absl::StrCat(base, ".index: entry '", f[0], "' points outside the dictionary"));
    out.push_back({std::string(f[0]), dict.substr(static_cast<size_t>(off), static_cast<size_t>(len))});
  }
  return out;
}

struct Candidate {
  std::string prompt, response;
  std::vector<std::string> answers;  // every accepted answer (response first); empty: just response
};

bool ValidUtf8(const std::string& s) {
  for (const CodeUnit& u : DecodeUtf8(s))
    if (u.cp == 0xFFFD && u.len == 1) return false;
  return true;
}

// Entries with text that is not UTF-8 (GCIDE has a few Windows-1252 bytes) are left out rather
// than trained on with replacement characters.
void Add(std::vector<Candidate>& out, std::set<std::string>& seen, Candidate c) {
  if (c.response.empty() || !ValidUtf8(c.prompt) || !ValidUtf8(c.response)) return;
  for (const std::string& a : c.answers)
    if (!ValidUtf8(a)) return;
  if (!seen.insert(c.prompt).second) return;
  out.push_back(std::move(c));
}

absl::StatusOr<std::vector<Candidate>> Wordnet() {
  std::vector<Candidate> out;
  std::set<std::string> seen;
  for (const char* pos : {"noun", "verb", "adj", "adv"}) {
    const std::string dir = Root() + "/wordnet/";
    FT_ASSIGN_OR_RETURN(std::string index, ReadFile(dir + "index." + pos, "wordnet-base"));
    FT_ASSIGN_OR_RETURN(std::string data, ReadFile(dir + "data." + pos, "wordnet-base"));
    const std::string pos_name = std::strcmp(pos, "adj") == 0 ? "adjective" : std::strcmp(pos, "adv") == 0 ? "adverb" : pos;
    for (absl::string_view line : absl::StrSplit(index, '\n')) {
      if (line.empty() || line[0] == ' ') continue;  // the licence header
      const std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (f.size() < 6) continue;
      const std::string lemma(f[0]);
      if (!IsPlainWord(lemma)) continue;
      const int synsets = std::atoi(std::string(f[2]).c_str());
      if (synsets < 1 || static_cast<size_t>(synsets) > f.size()) continue;
      // The first synset offset is the most frequent sense; offsets are byte offsets into data.
      const size_t off = static_cast<size_t>(std::strtoull(std::string(f[f.size() - static_cast<size_t>(synsets)]).c_str(), nullptr, 10));
      if (off >= data.size()) return absl::DataLossError(absl::StrCat(dir, "index.", pos, ": '", lemma, "' points outside data.", pos));
      const size_t eol = data.find('\n', off);
      const absl::string_view entry = absl::string_view(data).substr(off, eol - off);
      const size_t bar = entry.find(" | ");
      if (bar == absl::string_view::npos) continue;
      std::string gloss(entry.substr(bar + 3));
      const size_t example = gloss.find("; \"");
      if (example != std::string::npos) gloss.resize(example);
      gloss = CollapseSpace(gloss);
      if (gloss.size() < 8 || gloss.size() > 160 || gloss.find('"') != std::string::npos) continue;
      Add(out, seen, {absl::StrCat("Give the WordNet definition of the ", pos_name, " \"", lemma, "\"."), gloss, {}});
    }
  }
  return out;
}

absl::StatusOr<std::vector<Candidate>> Dictd(const std::string& name, const std::string& package,
                                             std::string (*extract)(const std::string&), const char* prompt) {
  FT_ASSIGN_OR_RETURN(std::vector<DictdEntry> entries, ReadDictd(name, package));
  std::vector<Candidate> out;
  std::set<std::string> seen;
  for (const DictdEntry& e : entries) {
    if (e.headword.size() > 40 || e.headword.find('"') != std::string::npos) continue;
    std::string def = extract(e.body);
    if (def.empty()) continue;
    std::string p = prompt;
    p.replace(p.find('@'), 1, e.headword);
    Add(out, seen, {p, def, {}});
  }
  return out;
}

absl::StatusOr<std::vector<Candidate>> Freedict(const std::string& lang_code, const std::string& language) {
  const std::string name = "freedict-eng-" + lang_code;
  FT_ASSIGN_OR_RETURN(std::vector<DictdEntry> entries, ReadDictd(name, "dict-" + name));
  std::vector<Candidate> out;
  std::set<std::string> seen;
  for (const DictdEntry& e : entries) {
    if (!IsPlainWord(e.headword)) continue;
    std::vector<std::string> t = FreedictTranslations(e.body);
    if (t.empty()) continue;
    Add(out, seen, {absl::StrCat("Translate the English word \"", e.headword, "\" into ", language, ". Give only the ", language, " word."), t[0], t});
  }
  return out;
}

// GNU gettext .mo catalogue: msgid -> msgstr (little- or big-endian).
absl::StatusOr<std::map<std::string, std::string>> ReadMo(const std::string& path) {
  FT_ASSIGN_OR_RETURN(std::string mo, ReadFile(path, "iso-codes"));
  auto u32 = [&](uint64_t at, bool swap) -> uint64_t {
    if (at > mo.size() || mo.size() - at < 4) return UINT64_MAX;
    uint32_t v = 0;
    std::memcpy(&v, mo.data() + static_cast<size_t>(at), 4);
    return swap ? __builtin_bswap32(v) : v;
  };
  const bool swap = u32(0, false) == 0xde120495u;
  if (!swap && u32(0, false) != 0x950412deu) return absl::DataLossError(absl::StrCat(path, ": not a gettext .mo file"));
  const uint64_t n = u32(8, swap), orig = u32(12, swap), trans = u32(16, swap);
  std::map<std::string, std::string> out;
  auto str = [&](uint64_t table, uint64_t i) -> std::optional<std::string> {
    const uint64_t len = u32(table + 8 * i, swap), off = u32(table + 8 * i + 4, swap);
    if (len == UINT64_MAX || off == UINT64_MAX || off + len > mo.size()) return std::nullopt;
    return mo.substr(static_cast<size_t>(off), static_cast<size_t>(len));
  };
  if (n > mo.size()) return absl::DataLossError(absl::StrCat(path, ": corrupt .mo header"));
  for (uint64_t i = 0; i < n; ++i) {
    auto a = str(orig, i), b = str(trans, i);
    if (!a || !b) return absl::DataLossError(absl::StrCat(path, ": string ", i, " outside the file"));
    if (!a->empty() && !b->empty()) out[*a] = *b;
  }
  return out;
}

absl::StatusOr<std::vector<Candidate>> IsoNames(const std::string& lang, const std::string& language) {
  std::vector<Candidate> out;
  std::set<std::string> seen;
  struct Table {
    const char* standard;
    const char* kind;
  };
  for (const Table t : {Table{"3166-1", "country"}, Table{"639-2", "language"}}) {
    const std::string json_path = Root() + "/iso-codes/json/iso_" + t.standard + ".json";
    FT_ASSIGN_OR_RETURN(std::string text, ReadFile(json_path, "iso-codes"));
    const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.contains(t.standard) || !j[t.standard].is_array()) return absl::DataLossError(absl::StrCat(json_path, ": unexpected format"));
    FT_ASSIGN_OR_RETURN(auto mo, ReadMo(Root() + "/locale/" + lang + "/LC_MESSAGES/iso_" + t.standard + ".mo"));
    for (const auto& e : j[t.standard]) {
      if (!e.contains("name") || !e["name"].is_string()) continue;
      // The common name where there is one ("Bolivia", not "Bolivia, Plurinational State of");
      // "Spanish; Castilian" asks for "Spanish".
      const bool common = e.contains("common_name") && e["common_name"].is_string();
      const std::string name = common ? e["common_name"] : e["name"];
      const auto it = mo.find(name);
      if (it == mo.end()) continue;
      const std::string english(absl::StripAsciiWhitespace(std::vector<std::string>(absl::StrSplit(name, ';'))[0]));
      std::vector<std::string> answers;
      for (absl::string_view a : absl::StrSplit(it->second, ';', absl::SkipWhitespace())) answers.emplace_back(absl::StripAsciiWhitespace(a));
      if (answers.empty()) continue;
      if (english.find('(') != std::string::npos) continue;
      Add(out, seen, {absl::StrCat("What is the ", language, " name of the ", t.kind, " \"", english, "\"? Give only the name."), answers[0], answers});
    }
  }
  return out;
}

}  // namespace

const std::vector<std::string>& TextSourceNames() {
  static const std::vector<std::string> names = {"wordnet", "gcide",   "foldoc",   "jargon",   "eng-fra",
                                                 "eng-deu", "eng-spa", "names-fr", "names-de", "names-es"};
  return names;
}

bool IsTextSource(const std::string& name) {
  const auto& n = TextSourceNames();
  return std::find(n.begin(), n.end(), name) != n.end();
}

int64_t DictdNumber(const std::string& s) {
  static const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  if (s.empty() || s.size() > 10) return -1;
  int64_t v = 0;
  for (char c : s) {
    const size_t d = alphabet.find(c);
    if (d == std::string::npos) return -1;
    v = v * 64 + static_cast<int64_t>(d);
  }
  return v;
}

std::string GcideFirstSense(const std::string& body) {
  // Webster entries only (GCIDE also carries WordNet 1.5 glosses, which are the wordnet source).
  const size_t tag = body.find("[1913 Webster]");
  if (tag == std::string::npos) return "";
  std::string head = body.substr(0, tag);
  std::string def;
  const size_t sense = head.find("\n   1. ");
  if (sense != std::string::npos) {
    def = head.substr(sense + 7);
    const size_t next = def.find("\n   2. ");
    if (next != std::string::npos) def.resize(next);
  } else {
    // "Word \pro*nun"ci*a`tion\ (...), pos. [etymology]\n   Definition": the definition starts on
    // the line after the header; the etymology in brackets may span lines.
    const size_t b1 = head.find('\\'), b2 = b1 == std::string::npos ? b1 : head.find('\\', b1 + 1);
    if (b2 == std::string::npos) return "";
    size_t i = b2 + 1;
    while (i < head.size() && head[i] != '\n') {
      if (head[i] == '[' || head[i] == '(') {
        i = SkipGroup(head, i, head[i], head[i] == '[' ? ']' : ')');
        if (i == std::string::npos) return "";
      } else {
        ++i;
      }
    }
    def = head.substr(std::min(i, head.size()));
  }
  const size_t para = def.find("\n\n");
  if (para != std::string::npos) def.resize(para);
  def = CollapseSpace(WithoutBraces(def));
  const size_t cite = def.find("--");  // "--Author." citations and "-- called also ..." asides
  if (cite != std::string::npos) def.resize(cite);
  // Drop trailing usage labels such as "[Obs.]"; any other bracket is GCIDE character markup
  // ("[ae]", "[=a]") that would teach garbage.
  while (!def.empty() && (def.back() == ' ' || def.back() == ';' || def.back() == ',')) def.pop_back();
  while (def.size() > 2 && def.back() == ']') {
    const size_t open = def.rfind('[');
    if (open == std::string::npos) return "";
    def.resize(open);
    while (!def.empty() && def.back() == ' ') def.pop_back();
  }
  if (def.find_first_of("[]\\\"*") != std::string::npos) return "";
  if (def.empty() || !std::isupper(static_cast<unsigned char>(def[0])) || def.starts_with("See ")) return "";
  def = FirstSentences(def, 200);
  if (def.size() < 12) return "";
  if (def.back() != '.') def += '.';
  return def;
}

std::string FoldocFirstSentence(const std::string& body) {
  // Headword (and alias) lines, a blank line, then paragraphs; the first paragraph is the entry's
  // summary, often with a "<category>" tag first.
  const size_t start = body.find("\n\n");
  if (start == std::string::npos) return "";
  std::string para = body.substr(start + 2);
  const size_t end = para.find("\n\n");
  if (end != std::string::npos) para.resize(end);
  std::string def = CollapseSpace(WithoutBraces(para));
  // Pronunciations "/*-breev'/," after the tag.
  for (size_t s = def.find(" /"); s != std::string::npos; s = def.find(" /")) {
    const size_t e = def.find('/', s + 2);
    if (e == std::string::npos || e - s > 30) break;
    size_t cut = e + 1;
    while (cut < def.size() && (def[cut] == ',' || def[cut] == ' ')) ++cut;
    def.erase(s + 1, cut - s - 1);
  }
  if (def.starts_with("See ") || def.starts_with("(") || def.size() < 12) return "";
  def = FirstSentences(def, 200);
  if (def.size() < 12 || def.find("http") != std::string::npos) return "";
  return def;
}

std::string JargonFirstSense(const std::string& body) {
  // "headword\n /pronunciation/\n n.\n\n    [usage]\n\n    1. n. Definition ..." (the part of speech
  // is on its own line or starts the sense).
  std::vector<std::string> paras;
  std::string pos;
  bool first = true;
  for (absl::string_view p : absl::StrSplit(body, "\n\n", absl::SkipWhitespace())) {
    std::string text = CollapseSpace(p);
    if (first) {  // headword line(s): keep a part of speech given there
      first = false;
      const size_t nl = p.find('\n');
      if (nl != absl::string_view::npos) {
        for (absl::string_view l : absl::StrSplit(p.substr(nl + 1), '\n', absl::SkipWhitespace())) {
          const std::string w(absl::StripAsciiWhitespace(l));
          if (!w.empty() && w[0] != '/' && w.size() < 16 && w.back() == '.') pos = w;
        }
      }
      continue;
    }
    if (!text.empty() && text[0] == '[') {  // a usage note first: "[techspeak] n. The ..." keeps what follows
      const size_t end = SkipGroup(text, 0, '[', ']');
      text = end == std::string::npos ? "" : std::string(absl::StripAsciiWhitespace(text.substr(end)));
    }
    if (text.empty() || text[0] == '/') continue;
    paras.push_back(text);
  }
  if (paras.empty()) return "";
  std::string def = WithoutBraces(paras[0]);
  if (def.starts_with("1. ")) def = def.substr(3);
  if (def.starts_with("See ") || def.starts_with("Synonym")) return "";
  if (!pos.empty() && !std::islower(static_cast<unsigned char>(def[0]))) def = pos + " " + def;
  def = FirstSentences(def, 200);
  if (def.size() < 12 || def.find('"') != std::string::npos) return "";
  return def;
}

std::vector<std::string> FreedictTranslations(const std::string& body) {
  // "house /haus/\n1. maison\n2. foyer, logis\n" (senses numbered when more than one).
  std::vector<std::string> out;
  bool head = true;
  for (absl::string_view line : absl::StrSplit(body, '\n', absl::SkipWhitespace())) {
    if (head) {
      head = false;
      continue;
    }
    std::string l(absl::StripAsciiWhitespace(line));
    // FreeDict eng-deu adds cross references: "Synonym: {x}", "see: {y}", "{inflected form}".
    if (l.find('{') != std::string::npos || l.find(':') != std::string::npos) continue;
    const size_t dot = l.find(". ");
    if (dot != std::string::npos && dot <= 3 && std::isdigit(static_cast<unsigned char>(l[0]))) l = l.substr(dot + 2);
    for (absl::string_view t : absl::StrSplit(l, ',')) {
      std::string w(absl::StripAsciiWhitespace(t));
      const size_t tag = w.find(" <");  // German gender: "Haus <neut>"
      if (tag != std::string::npos) w.resize(tag);
      if (w.empty() || w.size() > 40 || w.find_first_of("<>()[]\"/") != std::string::npos) continue;
      if (std::find(out.begin(), out.end(), w) == out.end()) out.push_back(w);
    }
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> GenerateTextSourceTask(const std::string& name, int n, uint64_t seed) {
  if (n < 1) return absl::InvalidArgumentError("task size must be >= 1");
  absl::StatusOr<std::vector<Candidate>> all;
  if (name == "wordnet") all = Wordnet();
  else if (name == "gcide") all = Dictd("gcide", "dict-gcide", GcideFirstSense, "Give the Webster's 1913 dictionary definition of \"@\".");
  else if (name == "foldoc") all = Dictd("foldoc", "dict-foldoc", FoldocFirstSentence, "Give the FOLDOC computing dictionary entry for \"@\".");
  else if (name == "jargon") all = Dictd("jargon", "dict-jargon", JargonFirstSense, "Give the Jargon File entry for \"@\".");
  else if (name == "eng-fra") all = Freedict("fra", "French");
  else if (name == "eng-deu") all = Freedict("deu", "German");
  else if (name == "eng-spa") all = Freedict("spa", "Spanish");
  else if (name == "names-fr") all = IsoNames("fr", "French");
  else if (name == "names-de") all = IsoNames("de", "German");
  else if (name == "names-es") all = IsoNames("es", "Spanish");
  else return absl::InvalidArgumentError(absl::StrCat("unknown text source '", name, "' (available: ", absl::StrJoin(TextSourceNames(), ", "), ")"));
  if (!all.ok()) return all.status();
  if (all->empty()) return absl::DataLossError(absl::StrCat(name, ": no usable entries"));
  // Deterministic sample: Fisher-Yates over the candidates in file order, the first n kept.
  Rng rng(seed);
  std::vector<Candidate>& c = *all;
  for (size_t i = c.size(); i > 1; --i) std::swap(c[i - 1], c[rng.Below(i)]);
  c.resize(std::min(c.size(), static_cast<size_t>(n)));
  std::vector<std::string> lines;
  lines.reserve(c.size());
  for (const Candidate& e : c) {
    nlohmann::json j;
    j["prompt"] = e.prompt;
    j["response"] = e.response;
    if (e.answers.size() > 1) j["answers"] = e.answers;
    lines.push_back(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));  // Latin-1 bytes -> U+FFFD
  }
  return lines;
}

}  // namespace fedtune::model
