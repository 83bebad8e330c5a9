// Logging: spdlog behind a small facade so call sites stay short and the sink is set once.
#pragma once

#include <string_view>

#include "spdlog/spdlog.h"

namespace fedtune {

// Sets the global level from a name (trace, debug, info, warn, error, off); returns false for
// an unknown name.
bool SetLogLevel(std::string_view level);

}  // namespace fedtune

#define FT_LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
#define FT_LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define FT_LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define FT_LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)
