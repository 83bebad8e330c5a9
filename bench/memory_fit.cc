// Fits the planner's memory model (planner/planner.h, MemoryModel) to peaks measured by
// bench/memory_model.sh, and checks a model against them:
//   bench_memory_fit MODEL.gguf runs/bench/memory/peaks.csv [--check] [--bf16]
// --bf16: the runs trained on cpu-bf16 (MemoryModel::Bf16OutputMiB is then part of the known
// memory; fedtune train's default kernels on a CPU with a bf16 unit).
// Without --check: least-squares fit of (fixed MiB, recompute_factor, logit-chunk factor) on the
// rows with recomputation and of kept_factor on the rows without (factors per byte of the
// shape's activation allocation, ModelShape); prints the constants. With --check: prints MemoryModel::Fitted()'s prediction for every row and the
// relative error (exit 1 if any is above 10%). The recompute column: 1 recomputation, 0 every
// activation kept, kN the activations of N sequences kept per pass (what workers choose within
// their memory, MemoryModel::Choose; checked, not fitted).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "kernels/backend.h"
#include "model/llama.h"
#include "planner/planner.h"

using namespace fedtune;

struct Row {
  int batch, seq, rank;
  std::string kind, modules, base;
  bool recompute;
  double peak;
  int kept_per_pass;  // kN rows: N; else 0
};

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: bench_memory_fit MODEL.gguf peaks.csv [--check]\n");
    return 2;
  }
  bool check = false, bf16 = false;
  for (int i = 3; i < argc; ++i) {
    check = check || std::string(argv[i]) == "--check";
    bf16 = bf16 || std::string(argv[i]) == "--bf16";
  }
  auto m = model::LlamaModel::Load(argv[1]);
  if (!m.ok()) {
    std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
    return 1;
  }
  const planner::ModelShape shape = planner::ModelShape::Of(**m);
  std::ifstream f(argv[2]);
  std::string line;
  std::getline(f, line);
  std::vector<Row> rows;
  while (std::getline(f, line)) {
    std::vector<std::string> c = absl::StrSplit(line, ',');
    if (c.size() < 8) continue;
    std::string mods = c[4];
    for (char& ch : mods)
      if (ch == ':') ch = ',';
    const int kept = c[6].size() > 1 && c[6][0] == 'k' ? std::stoi(c[6].substr(1)) : 0;
    if (kept > 0 && !check) continue;  // validation rows only
    rows.push_back({std::stoi(c[0]), std::stoi(c[1]), std::stoi(c[3]), c[2], mods, c[5], c[6] == "1", std::stod(c[7]), kept});
  }
  planner::MemoryModel mm = check ? planner::MemoryModel::Fitted() : planner::MemoryModel{};
  // Known part and features of every row.
  struct X {
    double known, tokens, logit;
  };
  std::vector<X> xs;
  for (const Row& r : rows) {
    const auto kind = model::ParseAdapterKind(r.kind);
    const auto mods = model::ParseModules(r.modules);
    const auto base = kernels::GgmlTypeFromName(r.base);
    model::AdapterSpec spec{*kind, r.rank, 2.0f * static_cast<float>(r.rank), false, 1};
    const double tokens = static_cast<double>(r.batch) * r.seq;
    xs.push_back({mm.BaseMiB(shape, *base) + mm.AdapterStateMiB(shape, spec, *mods, *mods) + (bf16 ? planner::MemoryModel::Bf16OutputMiB(shape, tokens) : 0.0), tokens,
                  std::min(tokens, static_cast<double>(bf16 && tokens > 64 ? kernels::kBf16LogitChunkRows : kernels::kLogitChunkRows)) *
                      static_cast<double>(shape.n_vocab) * 4 / (1 << 20)});
  }
  if (!check) {
    // Normal equations for y - known = a*1 + b*tokens*RecomputeBytesPerToken + c*logit (recompute rows).
    double A[3][3] = {}, B[3] = {};
    for (size_t i = 0; i < rows.size(); ++i) {
      if (!rows[i].recompute) continue;
      const double v[3] = {1, xs[i].tokens * shape.RecomputeBytesPerToken() / (1 << 20), xs[i].logit}, y = rows[i].peak - xs[i].known;
      for (int a = 0; a < 3; ++a) {
        B[a] += v[a] * y;
        for (int b = 0; b < 3; ++b) A[a][b] += v[a] * v[b];
      }
    }
    // Gaussian elimination.
    for (int p = 0; p < 3; ++p)
      for (int r = p + 1; r < 3; ++r) {
        const double f2 = A[r][p] / A[p][p];
        for (int c = p; c < 3; ++c) A[r][c] -= f2 * A[p][c];
        B[r] -= f2 * B[p];
      }
    double x[3];
    for (int p = 2; p >= 0; --p) {
      double s = B[p];
      for (int c = p + 1; c < 3; ++c) s -= A[p][c] * x[c];
      x[p] = s / A[p][p];
    }
    // No-recompute rows: per token and layer, given the fixed part and logits.
    double num = 0, den = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i].recompute) continue;
      const double t = xs[i].tokens * (shape.LayerCacheBytesPerToken() * static_cast<double>(shape.n_layer) + shape.DerivedBytesPerToken()) / (1 << 20);
      num += t * (rows[i].peak - xs[i].known - x[0] - x[2] * xs[i].logit);
      den += t * t;
    }
    std::printf("fixed_mib = %.2f\nrecompute_factor = %.4f\nlogit_factor = %.3f\nkept_factor = %.4f\n", x[0], x[1], x[2], den > 0 ? num / den : 0.0);
    return 0;
  }
  int bad = 0;
  double worst = 0;
  std::printf("%-6s %-4s %-9s %-4s %-9s %-5s %-3s %9s %9s %7s\n", "batch", "seq", "kind", "rank", "modules", "base", "rec", "measured", "predicted", "error");
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    mm.recompute = r.recompute;
    const auto kind = model::ParseAdapterKind(r.kind);
    const auto mods = model::ParseModules(r.modules);
    model::AdapterSpec spec{*kind, r.rank, 2.0f * static_cast<float>(r.rank), false, 1};
    planner::Candidate c{*mods, *kernels::GgmlTypeFromName(r.base), r.batch, 1};
    double pred = mm.PredictMiB(shape, spec, *mods, c, r.seq, 0, bf16);
    if (r.kept_per_pass > 0) pred -= (r.batch - r.kept_per_pass) * mm.KeptMiBPerSequence(shape, r.seq);
    const double err = (r.peak - pred) / pred;
    worst = std::max(worst, std::fabs(err));
    if (std::fabs(err) > 0.10) ++bad;
    const std::string rec = r.kept_per_pass > 0 ? "k" + std::to_string(r.kept_per_pass) : (r.recompute ? "1" : "0");
    std::printf("%-6d %-4d %-9s %-4d %-9s %-5s %-3s %9.1f %9.1f %+6.1f%%\n", r.batch, r.seq, r.kind.c_str(), r.rank, r.modules.c_str(), r.base.c_str(),
                rec.c_str(), r.peak, pred, 100 * err);
  }
  std::printf("worst |error| %.1f%% over %zu runs\n", 100 * worst, rows.size());
  return bad == 0 ? 0 : 1;
}
