// Real-text task sources (model/text_sources.h): the dictd/WordNet/gettext readers and the
// definition extractors on entries copied from the Debian packages, ROUGE-L against Google's
// rouge-score package, and (where the packages are installed, as scripts/setup.sh does) every
// source end to end.
#include "model/text_sources.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "model/finetune.h"
#include "model/tasks.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

namespace fs = std::filesystem;

TEST(TextSources, DictdNumbersAreBase64Digits) {
  EXPECT_EQ(DictdNumber("A"), 0);
  EXPECT_EQ(DictdNumber("B/b"), 1 * 4096 + 63 * 64 + 27);
  EXPECT_EQ(DictdNumber("LNK"), 11 * 4096 + 13 * 64 + 10);
  EXPECT_EQ(DictdNumber(""), -1);
  EXPECT_EQ(DictdNumber("a-b"), -1);
  EXPECT_EQ(DictdNumber("AAAAAAAAAAA"), -1);  // longer than any offset dictd writes
}

TEST(TextSources, GcideFirstSense) {
  // Entries as in dict-gcide 0.48.5 (gcide.dict.dz).
  EXPECT_EQ(GcideFirstSense("Kettle \\Ket\"tle\\ (k[e^]t\"t'l), n. [OE. ketel; cf. AS. cetel,\n   cetil; akin to D. kjedel.]\n"
                            "   A metallic vessel, with a wide mouth, often without a cover,\n   used for heating and boiling water or other liguids.\n"
                            "   [1913 Webster]\n\n   {Kettle pins}, ninepins; skittles. [Obs.] --Shelton.\n"),
            "A metallic vessel, with a wide mouth, often without a cover, used for heating and boiling water or other liguids.");
  EXPECT_EQ(GcideFirstSense("Apple \\Ap\"ple\\ ([a^]p\"p'l), n. [OE. appel, eppel, AS. [ae]ppel,\n   [ae]pl; of\n   unknown origin.]\n"
                            "   1. The fleshy pome or fruit of a rosaceous tree ({Pyrus\n      malus}) cultivated in numberless varieties in the\n"
                            "      temperate zones.\n      [1913 Webster]\n\n   Note: The European crab apple\n"),
            "The fleshy pome or fruit of a rosaceous tree (Pyrus malus) cultivated in numberless varieties in the temperate zones.");
  EXPECT_EQ(GcideFirstSense("Exculpable \\Ex*cul\"pa*ble\\\n   Capable of being exculpated; deserving exculpation. --Sir G.\n   Buck.\n   [1913 Webster]\n"),
            "Capable of being exculpated; deserving exculpation.");
  EXPECT_EQ(GcideFirstSense("Patela \\Pat\"e*la\\, n. [Hind. patel[=a].]\n   A large flat-bottomed trading boat peculiar to the river\n"
                            "   Ganges; -- called also {puteli}.\n   [1913 Webster]\n"),
            "A large flat-bottomed trading boat peculiar to the river Ganges.");
  // WordNet-derived entries belong to the wordnet source; cross references teach nothing.
  EXPECT_EQ(GcideFirstSense("1000th \\1000th\\ adj.\n   1. coming next after the nine hundred ninety-ninth in a\n      series\n\n   Syn: thousandth\n        [WordNet 1.5]\n"), "");
  EXPECT_EQ(GcideFirstSense("Almry \\Alm\"ry\\, n.\n   See {Almonry}.\n   [1913 Webster]\n"), "");
  EXPECT_EQ(GcideFirstSense("Caf\\'e \\Ca*f['e]\\, n.\n   A coff[`e]e house.\n   [1913 Webster]\n"), "");  // character markup
}

TEST(TextSources, FoldocJargonAndFreedict) {
  EXPECT_EQ(FoldocFirstSentence("abbrev\n\n   <jargon> /*-breev'/, /*-brev'/ Common abbreviation for\n   \"abbreviation\".\n\n   (1995-02-27)\n\n"),
            "<jargon> Common abbreviation for \"abbreviation\".");
  EXPECT_EQ(FoldocFirstSentence("compiler\n\n   <programming, tool> A program that converts another program\n   from some {source language} (or {programming language}) to\n"
                                "   {machine language} (object code).  Some compilers output\n   {assembly language} which is then converted to {machine\n"
                                "   language} by a separate {assembler}.\n\n   A compiler is distinguished\n"),
            "<programming, tool> A program that converts another program from some source language (or programming language) to machine "
            "language (object code).");  // whole sentences within 200 characters
  EXPECT_EQ(JargonFirstSense("kluge\n /klooj/\n\n    [from the German 'klug', clever]\n\n    1. n. A Rube Goldberg (or Heath Robinson) device, whether in hardware or\n"
                             "    software.\n\n    2. n. A clever programming trick.\n"),
            "n. A Rube Goldberg (or Heath Robinson) device, whether in hardware or software.");
  EXPECT_EQ(JargonFirstSense("demon dialer\n n.\n\n    A program which repeatedly calls the same telephone number.\n\n"),
            "n. A program which repeatedly calls the same telephone number.");
  EXPECT_EQ(JargonFirstSense("hard boot\n n.\n\n    See {boot}.\n\n"), "");
  EXPECT_EQ(FreedictTranslations("abandon /əbændən/\n1. abdiquer\n2. abandonner, délaisser\n3. renoncer\n"),
            (std::vector<std::string>{"abdiquer", "abandonner", "délaisser", "renoncer"}));
  EXPECT_EQ(FreedictTranslations("house /hˈaʊs/\nGeschlecht <neut>, Familie <fem>\nsee: {home}\n"), (std::vector<std::string>{"Geschlecht", "Familie"}));
}

// Oracle: rouge-score 0.1.2 (PyPI), RougeScorer(['rougeL']).score(reference, candidate)['rougeL'].fmeasure.
TEST(TextSources, RougeLMatchesRougeScore) {
  struct Case {
    const char *ref, *cand;
    double f;
  };
  for (const Case& c : {Case{"the cat sat on the mat", "the cat lay on the mat", 0.8333333333},
                        Case{"A metallic vessel, with a wide mouth, used for heating water.", "a vessel for boiling water", 0.5},
                        Case{"n. A clever programming trick.", "A programming trick that is clever, n.", 0.5},
                        Case{"Capable of being exculpated; deserving exculpation.", "deserving blame", 0.25},
                        Case{"<programming, tool> A program that converts another program", "A program which converts programs (compiler)", 0.4285714286},
                        Case{"abc", "xyz", 0.0}, Case{"", "xyz", 0.0}})
    EXPECT_NEAR(RougeL(c.ref, c.cand), c.f, 1e-9) << c.ref << " | " << c.cand;
  EXPECT_DOUBLE_EQ(RougeL("maison", "Maison"), 1.0);
  EXPECT_DOUBLE_EQ(RougeL("stupéfier", "stupéfier"), 1.0);  // non-ASCII words are kept
}

// A gettext catalogue with the given msgid -> msgstr pairs (sorted, as msgfmt writes them).
void WriteMo(const fs::path& path, const std::vector<std::pair<std::string, std::string>>& pairs) {
  std::string strings;
  std::vector<uint32_t> orig, trans;
  const uint32_t n = static_cast<uint32_t>(pairs.size());
  const uint32_t data_start = 28 + 16 * n;
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<uint32_t>& table = pass == 0 ? orig : trans;
    for (const auto& p : pairs) {
      const std::string& s = pass == 0 ? p.first : p.second;
      table.push_back(static_cast<uint32_t>(s.size()));
      table.push_back(data_start + static_cast<uint32_t>(strings.size()));
      strings += s;
      strings += '\0';
    }
  }
  std::vector<uint32_t> head = {0x950412deu, 0, n, 28, 28 + 8 * n, 0, 0};
  std::ofstream out(path, std::ios::binary);
  auto put = [&](const std::vector<uint32_t>& v) { out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(4 * v.size())); };
  put(head);
  put(orig);
  put(trans);
  out << strings;
}

TEST(TextSources, IsoNamesFromAFakeRootAndMissingPackagesAreNamed) {
  const fs::path root = fs::temp_directory_path() / ("fedtune_text_root_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "iso-codes/json");
  fs::create_directories(root / "locale/fr/LC_MESSAGES");
  std::ofstream(root / "iso-codes/json/iso_3166-1.json")
      << R"({"3166-1": [{"alpha_2": "DE", "name": "Germany"}, {"alpha_2": "BO", "name": "Bolivia, Plurinational State of", "common_name": "Bolivia"},
                        {"alpha_2": "XX", "name": "Nowhere"}]})";
  std::ofstream(root / "iso-codes/json/iso_639-2.json") << R"({"639-2": [{"alpha_3": "spa", "name": "Spanish; Castilian"}]})";
  WriteMo(root / "locale/fr/LC_MESSAGES/iso_3166-1.mo", {{"Bolivia", "Bolivie"}, {"Germany", "Allemagne"}});
  WriteMo(root / "locale/fr/LC_MESSAGES/iso_639-2.mo", {{"Spanish; Castilian", "espagnol; castillan"}});
  ::setenv("FEDTUNE_TEXT_ROOT", root.c_str(), 1);
  auto lines = GenerateTask("names-fr", 10, 1);
  ASSERT_TRUE(lines.ok()) << lines.status();
  std::set<std::string> got;
  for (const auto& l : *lines) {
    const auto j = nlohmann::json::parse(l);
    got.insert(j["prompt"].get<std::string>() + " -> " + j["response"].get<std::string>());
    if (j["response"] == "espagnol") {
      EXPECT_EQ(j["answers"], nlohmann::json({"espagnol", "castillan"}));
    }
  }
  EXPECT_EQ(got, (std::set<std::string>{"What is the French name of the country \"Germany\"? Give only the name. -> Allemagne",
                                        "What is the French name of the country \"Bolivia\"? Give only the name. -> Bolivie",
                                        "What is the French name of the language \"Spanish\"? Give only the name. -> espagnol"}));
  const auto missing = GenerateTask("gcide", 10, 1);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("dict-gcide"), std::string::npos) << missing.status();
  std::ofstream(root / "locale/fr/LC_MESSAGES/iso_639-2.mo") << "not a catalogue";
  EXPECT_EQ(GenerateTask("names-fr", 10, 1).status().code(), absl::StatusCode::kDataLoss);
  ::unsetenv("FEDTUNE_TEXT_ROOT");
  fs::remove_all(root);
  EXPECT_EQ(GenerateTask("klingon", 10, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

// Every source from the installed Debian packages: enough distinct, well-formed examples, the
// same sample for the same seed.
TEST(TextSources, EverySourceFromTheDebianPackages) {
  if (!fs::exists("/usr/share/dictd/gcide.index") || !fs::exists("/usr/share/wordnet/data.noun"))
    GTEST_SKIP() << "the dictionary packages are not installed (scripts/setup.sh installs them)";
  const std::map<std::string, size_t> at_least = {{"wordnet", 60000}, {"gcide", 60000}, {"foldoc", 10000}, {"jargon", 1000},
                                                  {"eng-fra", 5000},  {"eng-deu", 60000}, {"eng-spa", 4000}, {"names-fr", 600},
                                                  {"names-de", 600},  {"names-es", 600}};
  for (const auto& name : TextSourceNames()) {
    auto all = GenerateTask(name, 1 << 30, 3);
    ASSERT_TRUE(all.ok()) << name << ": " << all.status();
    EXPECT_GE(all->size(), at_least.at(name)) << name;
    std::set<std::string> prompts;
    for (const auto& l : *all) {
      const auto j = nlohmann::json::parse(l, nullptr, false);
      ASSERT_FALSE(j.is_discarded()) << name << ": " << l;
      const std::string response = j["response"];
      EXPECT_FALSE(response.empty()) << l;
      EXPECT_EQ(response.find_first_of("{}\n"), std::string::npos) << l;
      EXPECT_TRUE(prompts.insert(j["prompt"]).second) << "duplicate prompt " << l;
    }
    // Sampling is the same code for every source: its determinism is checked on the smaller
    // ones (each call parses the whole source; the three largest take most of this test).
    if (all->size() > 20000) continue;
    auto a = GenerateTask(name, 50, 7), b = GenerateTask(name, 50, 7), c = GenerateTask(name, 50, 8);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
    EXPECT_EQ(*a, *b) << name;
    EXPECT_NE(*a, *c) << name;
  }
}

}  // namespace
}  // namespace fedtune::model
