// Real-text tasks read at run time from Debian packages (never committed, never downloaded by
// us): dictionary definitions and word translations, one source per client for naturally
// non-IID federations (issue 21). Each source keeps its own style, size and vocabulary:
//
//   wordnet   definition of a word in WordNet's gloss style        wordnet-base
//   gcide     the first sense of a Webster 1913 entry (GCIDE)      dict-gcide
//   foldoc    the first sentence of a FOLDOC computing entry       dict-foldoc
//   jargon    the first sense of a Jargon File entry               dict-jargon
//   eng-fra, eng-deu, eng-spa   one-word translations (FreeDict)   dict-freedict-eng-{fra,deu,spa}
//   names-fr, names-de, names-es  country and language names in French / German / Spanish from
//             the ISO 3166-1 and ISO 639-2 tables and their translations    iso-codes
//
// The definition tasks teach a style and format (WordNet's lowercase gloss, Webster's capitalised
// sense, FOLDOC's "<category>" tag, the Jargon File's part-of-speech prefix), which generalises
// to held-out words; translations and names are short answers scored by exact match against any
// of the listed translations ("answers"), rote knowledge a 135M model mostly lacks. Each example
// is one JSONL line {"prompt", "response"[, "answers"]}; the most frequent sense (WordNet) or the
// first sense (dictd sources) only, so one prompt has one reference.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace fedtune::model {

// The names above.
const std::vector<std::string>& TextSourceNames();
bool IsTextSource(const std::string& name);

// Up to n examples of the source, a deterministic sample given the seed (fewer when the source
// has fewer usable entries: names-* have ~700). The files are read from $FEDTUNE_TEXT_ROOT when
// set (tests), else /usr/share. NotFound naming the Debian package when its files are missing.
absl::StatusOr<std::vector<std::string>> GenerateTextSourceTask(const std::string& name, int n, uint64_t seed);

// Exposed for tests: the dictd index's base-64 numbers ("B/b" -> 8155), and the definition
// extractors applied to one dictd entry body (empty when the entry is not usable).
int64_t DictdNumber(const std::string& s);
std::string GcideFirstSense(const std::string& body);
std::string FoldocFirstSentence(const std::string& body);
std::string JargonFirstSense(const std::string& body);
std::vector<std::string> FreedictTranslations(const std::string& body);

}  // namespace fedtune::model
