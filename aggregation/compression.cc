#include "aggregation/compression.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace fedtune::aggregation {
namespace {

size_t Blocks(size_t n) { return (n + kCompressionBlock - 1) / kCompressionBlock; }

int Round(float v) { return static_cast<int>(std::lround(v)); }

}  // namespace

const char* CompressionName(Compression c) {
  switch (c) {
    case Compression::kNone: return "none";
    case Compression::kInt8: return "int8";
    case Compression::kInt4: return "int4";
    case Compression::kTopK: return "topk";
  }
  return "?";
}

absl::StatusOr<Compression> CompressionFromName(const std::string& name) {
  for (Compression c : {Compression::kNone, Compression::kInt8, Compression::kInt4, Compression::kTopK})
    if (name == CompressionName(c)) return c;
  if (name.empty()) return Compression::kNone;
  return absl::InvalidArgumentError(absl::StrCat("unknown compression '", name, "' (none, int8, int4, topk)"));
}

CompressedTensor Compress(std::span<const float> x, Compression kind, double topk_fraction) {
  CompressedTensor c;
  c.kind = kind;
  c.n = x.size();
  if (kind == Compression::kInt8 || kind == Compression::kInt4) {
    const float levels = kind == Compression::kInt8 ? 127.0f : 7.0f;
    c.scales.resize(Blocks(c.n));
    if (kind == Compression::kInt8) c.q8.resize(c.n);
    if (kind == Compression::kInt4) c.q4.assign((c.n + 1) / 2, 0);
    for (size_t b = 0; b < c.scales.size(); ++b) {
      const size_t lo = b * kCompressionBlock, hi = std::min(c.n, lo + kCompressionBlock);
      float amax = 0;
      for (size_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float scale = amax / levels;
      c.scales[b] = scale;
      const float inv = scale > 0 ? 1.0f / scale : 0.0f;
      for (size_t i = lo; i < hi; ++i) {
        const int q = std::clamp(Round(x[i] * inv), -static_cast<int>(levels), static_cast<int>(levels));
        if (kind == Compression::kInt8) {
          c.q8[i] = static_cast<int8_t>(q);
        } else {
          c.q4[i / 2] |= static_cast<uint8_t>((q + 8) << (4 * (i % 2)));
        }
      }
    }
  } else if (kind == Compression::kTopK) {
    const size_t k = std::clamp<size_t>(static_cast<size_t>(std::ceil(topk_fraction * static_cast<double>(c.n))), c.n ? 1 : 0, c.n);
    std::vector<uint32_t> order(c.n);
    std::iota(order.begin(), order.end(), 0u);
    // Largest magnitudes first; ties by index so the choice is deterministic.
    std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(), [&](uint32_t a, uint32_t b) {
      const float fa = std::fabs(x[a]), fb = std::fabs(x[b]);
      return fa != fb ? fa > fb : a < b;
    });
    order.resize(k);
    std::sort(order.begin(), order.end());
    c.indices = std::move(order);
    c.values.reserve(k);
    for (uint32_t i : c.indices) c.values.push_back(x[i]);
  }
  return c;
}

std::vector<float> Decompress(const CompressedTensor& c) {
  std::vector<float> out(c.n, 0.0f);
  if (c.kind == Compression::kInt8) {
    for (size_t i = 0; i < c.n; ++i) out[i] = c.scales[i / kCompressionBlock] * static_cast<float>(c.q8[i]);
  } else if (c.kind == Compression::kInt4) {
    for (size_t i = 0; i < c.n; ++i)
      out[i] = c.scales[i / kCompressionBlock] * static_cast<float>(static_cast<int>((c.q4[i / 2] >> (4 * (i % 2))) & 0xF) - 8);
  } else if (c.kind == Compression::kTopK) {
    for (size_t j = 0; j < c.indices.size(); ++j) out[c.indices[j]] = c.values[j];
  }
  return out;
}

double CompressedBytesPerFp32Byte(Compression kind, double topk_fraction) {
  switch (kind) {
    case Compression::kInt8: return (1.0 + 4.0 / kCompressionBlock) / 4.0;
    case Compression::kInt4: return (0.5 + 4.0 / kCompressionBlock) / 4.0;
    case Compression::kTopK: return 2.0 * topk_fraction;
    default: return 1.0;
  }
}

size_t PayloadBytes(const CompressedTensor& c) {
  return c.scales.size() * sizeof(float) + c.q8.size() + c.q4.size() + c.indices.size() * sizeof(uint32_t) + c.values.size() * sizeof(float);
}

absl::Status CheckCompressed(const CompressedTensor& c, size_t n) {
  auto bad = [](const std::string& why) { return absl::InvalidArgumentError(why); };
  if (c.n != n) return bad(absl::StrCat("compressed tensor of ", c.n, " values, expected ", n));
  if (c.kind == Compression::kInt8 || c.kind == Compression::kInt4) {
    if (c.scales.size() != Blocks(n)) return bad(absl::StrCat(c.scales.size(), " scales, expected ", Blocks(n)));
    for (float s : c.scales)
      if (!std::isfinite(s) || s < 0) return bad("a scale is negative or non-finite");
    if (c.kind == Compression::kInt8) {
      if (c.q8.size() != n) return bad(absl::StrCat(c.q8.size(), " int8 codes, expected ", n));
      for (int8_t q : c.q8)
        if (q == -128) return bad("an int8 code is -128 (codes are in [-127, 127])");
    } else {
      if (c.q4.size() != (n + 1) / 2) return bad(absl::StrCat(c.q4.size(), " int4 bytes, expected ", (n + 1) / 2));
      for (size_t i = 0; i < n; ++i)
        if (((c.q4[i / 2] >> (4 * (i % 2))) & 0xF) == 0) return bad("an int4 code is -8 (codes are in [-7, 7])");
    }
  } else if (c.kind == Compression::kTopK) {
    if (c.indices.size() != c.values.size() || c.indices.size() > n) return bad("top-k indices and values differ in count or exceed the tensor");
    for (size_t j = 0; j < c.indices.size(); ++j) {
      if (c.indices[j] >= n || (j > 0 && c.indices[j] <= c.indices[j - 1])) return bad("top-k indices out of range or not strictly increasing");
      if (!std::isfinite(c.values[j])) return bad("a top-k value is non-finite");
    }
  } else {
    return bad("compressed tensor without a compression kind");
  }
  return absl::OkStatus();
}

void CompressUpdate(ClientUpdate* u, Compression kind, double topk_fraction, TensorMap* residual) {
  u->compressed.clear();
  if (kind == Compression::kNone) return;
  for (auto& [name, d] : u->delta) {
    if (residual) {
      std::vector<float>& r = (*residual)[name];
      if (r.size() != d.size()) r.assign(d.size(), 0.0f);  // first round, or a different shape
      for (size_t i = 0; i < d.size(); ++i) d[i] += r[i];
    }
    CompressedTensor c = Compress(d, kind, topk_fraction);
    std::vector<float> sent = Decompress(c);
    if (residual) {
      std::vector<float>& r = (*residual)[name];
      for (size_t i = 0; i < d.size(); ++i) r[i] = d[i] - sent[i];
    }
    d = std::move(sent);
    u->compressed[name] = std::move(c);
  }
}

}  // namespace fedtune::aggregation
