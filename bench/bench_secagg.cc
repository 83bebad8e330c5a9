// Secure aggregation cost per client and for the server, for 10, 50 and 200 clients (SecAgg+
// neighbour degree k ~ 2 log2 n, and the complete graph for comparison), with 10% of the
// clients dropping before their masked input. Prints one line per configuration.
//   build/bench/bench_secagg [vector_length=100000]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "common/rng.h"
#include "privacy/secagg.h"

using namespace fedtune::privacy;
using namespace fedtune::privacy::secagg;
using Clock = std::chrono::steady_clock;

static double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

int main(int argc, char** argv) {
  const size_t len = argc > 1 ? static_cast<size_t>(std::atol(argv[1])) : 100000;
  std::printf("secure aggregation, %zu values per client, 10%% dropping before masked input (1 core)\n", len);
  std::printf("%-8s %-8s %-6s %-14s %-14s %-14s %-16s %-12s %-10s\n", "clients", "degree", "t", "client keys s", "client mask s",
              "client unmask s", "client bytes up", "server s", "max error");
  for (int n : {10, 50, 200}) {
    for (bool complete : {false, true}) {
      if (complete && n > 50) continue;
      Config c;
      c.num_clients = n;
      c.degree = complete ? 0 : std::min(n - 1, 2 * static_cast<int>(std::ceil(std::log2(n))));
      if (!complete && c.degree % 2) --c.degree;
      c.vector_length = len;
      c.graph_seed = 7;
      if (auto st = Validate(c); !st.ok()) {
        std::printf("invalid: %s\n", std::string(st.message()).c_str());
        return 1;
      }
      auto rounding = NoiseSource::Create();
      Server server(c);
      std::vector<std::unique_ptr<Client>> clients;
      std::vector<std::vector<float>> x(static_cast<size_t>(n), std::vector<float>(len));
      fedtune::Rng rng(1);
      for (auto& v : x)
        for (float& f : v) f = static_cast<float>(rng.Uniform() * 2 - 1);
      double t_keys = 0, t_mask = 0, t_unmask = 0;
      double bytes = 0;
      for (int i = 0; i < n; ++i) {
        const auto t0 = Clock::now();
        clients.push_back(std::move(*Client::Create(c, i)));
        const PublicKeys pk = clients.back()->Advertise();
        t_keys += Since(t0);
        bytes += sizeof(PublicKeys);
        (void)server.ReceiveKeys(pk);
      }
      for (auto& cl : clients) {
        const auto t0 = Clock::now();
        auto sh = cl->ShareKeys(server.KeysFor(cl->id()));
        t_keys += Since(t0);
        for (const auto& s : *sh) bytes += static_cast<double>(s.ciphertext.size()) + 8;
        (void)server.ReceiveShares(cl->id(), *sh);
      }
      const int drop_every = 10;
      for (auto& cl : clients) {
        if (cl->id() % drop_every == 3) continue;
        const auto t0 = Clock::now();
        auto y = cl->MaskedInput(x[static_cast<size_t>(cl->id())], server.SharesFor(cl->id()), **rounding);
        t_mask += Since(t0);
        bytes += static_cast<double>(len) * 4;
        (void)server.ReceiveMasked(cl->id(), std::move(*y));
      }
      const auto dropped = server.Dropped(), survivors = server.Survivors();
      for (auto& cl : clients) {
        if (cl->id() % drop_every == 3) continue;
        const auto t0 = Clock::now();
        auto r = cl->Unmask(dropped, survivors);
        t_unmask += Since(t0);
        bytes += static_cast<double>(r->mask_key_shares.size() + r->self_mask_shares.size()) * 48;
        (void)server.ReceiveUnmask(*r);
      }
      const auto t0 = Clock::now();
      auto res = server.Finish();
      const double t_server = Since(t0);
      if (!res.ok()) {
        std::printf("failed: %s\n", std::string(res.status().message()).c_str());
        return 1;
      }
      double err = 0;
      for (size_t i = 0; i < len; ++i) {
        double plain = 0;
        for (int u : res->survivors) plain += x[static_cast<size_t>(u)][i];
        err = std::max(err, std::fabs(plain - res->sum[i]));
      }
      const int live = static_cast<int>(survivors.size());
      std::printf("%-8d %-8d %-6d %-14.4f %-14.4f %-14.5f %-16.0f %-12.3f %-10.2e\n", n, EffectiveDegree(c), EffectiveThreshold(c), t_keys / n,
                  t_mask / live, t_unmask / live, bytes / n, t_server, err);
    }
  }
  return 0;
}
