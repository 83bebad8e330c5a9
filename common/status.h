// Error handling conventions for fedtune (see CONVENTIONS.md, habit 6).
//
// Broken invariants abort with file and line (FT_CHECK). Everything caused by input, files,
// the network or peers returns absl::Status with a precise code and a message that names the
// thing at fault:
//   NotFound           a file, tensor, key or token that does not exist
//   InvalidArgument    a bad value supplied by the user (CLI flag, config value, shape)
//   DataLoss           a file whose bytes are corrupt or truncated (GGUF, safetensors, ...)
//   Unimplemented      well-formed input that fedtune does not support (a block type, arch)
//   FailedPrecondition an operation called in the wrong state
//   OutOfRange         an index or length past a limit (context length, token id)
//   ResourceExhausted  a memory or size budget exceeded
//   Internal           a failure of the OS or a library that is not the caller's fault
#pragma once

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define FT_CHECK(cond)                                                              \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: FT_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)

#define FT_STATUS_CONCAT_INNER(a, b) a##b
#define FT_STATUS_CONCAT(a, b) FT_STATUS_CONCAT_INNER(a, b)

#define FT_RETURN_IF_ERROR(expr)              \
  do {                                        \
    ::absl::Status ft_status_ = (expr);       \
    if (!ft_status_.ok()) return ft_status_;  \
  } while (0)

#define FT_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return std::move(tmp).status(); \
  lhs = std::move(tmp).value()

// FT_ASSIGN_OR_RETURN(auto x, MakeX()); returns the error status of MakeX() if any.
#define FT_ASSIGN_OR_RETURN(lhs, expr) \
  FT_ASSIGN_OR_RETURN_IMPL(FT_STATUS_CONCAT(ft_statusor_, __LINE__), lhs, expr)
