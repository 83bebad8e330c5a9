// The slice of Unicode the tokenizers need: UTF-8 decoding that never fails (invalid bytes
// become single-byte units), general-category tests for \p{L} and \p{N}, and White_Space.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fedtune::model {

struct CodeUnit {
  uint32_t cp;      // code point, or 0xFFFD for an invalid byte
  uint32_t offset;  // byte offset in the input
  uint32_t len;     // bytes in the input
};

std::vector<CodeUnit> DecodeUtf8(std::string_view s);
void AppendUtf8(uint32_t cp, std::string* out);
bool IsLetter(uint32_t cp);
bool IsNumber(uint32_t cp);
bool IsWhitespace(uint32_t cp);  // Unicode White_Space, as regex \s

}  // namespace fedtune::model
