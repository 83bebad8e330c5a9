#include "federation/secure_server.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "protocol/secagg_wire.h"

namespace fedtune::federation {

absl::StatusOr<std::unique_ptr<SecureServer>> SecureServer::Begin(const std::vector<std::string>& clients, const aggregation::TensorMap& layout,
                                                                  const protocol::TrainTask::Secure& secagg, int full_share, bool by_component) {
  std::unique_ptr<SecureServer> s(new SecureServer());
  size_t n = 0;
  for (const auto& [name, v] : layout) n += v.size();
  protocol::TrainTask::Secure p = secagg;
  p.id = 0;
  p.clients = static_cast<int>(clients.size());
  FT_ASSIGN_OR_RETURN(s->cfg_, protocol::SecAggConfig(p, protocol::SecAggVectorLength(p, n)));
  s->params_ = p;
  if (!p.shares.empty() && p.shares.size() != clients.size())
    return absl::InvalidArgumentError(absl::StrCat("secure aggregation: ", p.shares.size(), " shares for ", clients.size(), " clients"));
  if (!p.shares.empty() && full_share < 1) return absl::InvalidArgumentError("secure aggregation: per-worker shares need the full share");
  s->full_share_ = full_share;
  s->by_component_ = by_component;
  s->scale_ = protocol::SecAggScale(s->cfg_, secagg.value_range);
  for (const auto& [name, v] : layout) s->layout_[name].resize(v.size());
  s->names_ = clients;
  for (size_t i = 0; i < clients.size(); ++i) s->ids_[clients[i]] = static_cast<int>(i);
  s->server_ = std::make_unique<privacy::secagg::Server>(s->cfg_);
  return s;
}

int SecureServer::IdOf(const std::string& client) const {
  auto it = ids_.find(client);
  return it == ids_.end() ? -1 : it->second;
}

absl::StatusOr<int> SecureServer::Check(const std::string& client, int claimed) const {
  const int id = IdOf(client);
  if (id < 0) return absl::FailedPreconditionError(absl::StrCat("secure aggregation: ", client, " is not in this round"));
  if (claimed != id) return absl::PermissionDeniedError(absl::StrCat("secure aggregation: ", client, " (id ", id, ") spoke for id ", claimed));
  return id;
}

absl::Status SecureServer::Keys(const std::string& client, const privacy::secagg::PublicKeys& k) {
  FT_RETURN_IF_ERROR(Check(client, k.id).status());
  bytes_ += static_cast<int64_t>(sizeof(k));
  return server_->ReceiveKeys(k);
}

std::vector<privacy::secagg::PublicKeys> SecureServer::KeysFor(const std::string& client) const {
  const int id = IdOf(client);
  return id < 0 ? std::vector<privacy::secagg::PublicKeys>{} : server_->KeysFor(id);
}

absl::Status SecureServer::Shares(const std::string& client, const std::vector<privacy::secagg::EncryptedShare>& shares) {
  FT_ASSIGN_OR_RETURN(int id, Check(client, shares.empty() ? IdOf(client) : shares.front().from));
  for (const auto& sh : shares) {
    if (sh.from != id) return absl::PermissionDeniedError(absl::StrCat("secure aggregation: ", client, " sent a share from id ", sh.from));
    bytes_ += static_cast<int64_t>(sh.ciphertext.size());
  }
  return server_->ReceiveShares(id, shares);
}

std::vector<privacy::secagg::EncryptedShare> SecureServer::SharesFor(const std::string& client) const {
  const int id = IdOf(client);
  return id < 0 ? std::vector<privacy::secagg::EncryptedShare>{} : server_->SharesFor(id);
}

absl::Status SecureServer::Masked(const std::string& client, std::vector<uint32_t> y, double weight, int64_t num_examples) {
  FT_ASSIGN_OR_RETURN(int id, Check(client, IdOf(client)));
  if (y.size() != cfg_.vector_length)
    return absl::InvalidArgumentError(absl::StrCat("secure aggregation: masked input of ", y.size(), " values, expected ", cfg_.vector_length));
  if (!(weight >= 0) || !std::isfinite(weight)) return absl::InvalidArgumentError("secure aggregation: bad weight");
  bytes_ += static_cast<int64_t>(y.size() * sizeof(uint32_t));
  FT_RETURN_IF_ERROR(server_->ReceiveMasked(id, std::move(y)));
  weights_[id] = {weight, num_examples};
  return absl::OkStatus();
}

absl::Status SecureServer::Unmask(const std::string& client, const privacy::secagg::UnmaskReply& r) {
  FT_RETURN_IF_ERROR(Check(client, r.from).status());
  bytes_ += static_cast<int64_t>((r.mask_key_shares.size() + r.self_mask_shares.size()) * sizeof(privacy::Share));
  return server_->ReceiveUnmask(r);
}

absl::StatusOr<SecureServer::Sum> SecureServer::Finish() {
  if (!params_.shares.empty())
    FT_RETURN_IF_ERROR(protocol::CheckShareCounts(params_.shares, server_->Survivors(), layout_, full_share_, privacy::secagg::EffectiveThreshold(cfg_)));
  FT_ASSIGN_OR_RETURN(privacy::secagg::Result res, server_->Finish());
  Sum out;
  size_t off = 0;
  for (const auto& [name, v] : layout_) {
    std::vector<float>& t = out.sum[name];
    t.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) t[i] = static_cast<float>(res.sum[off + i] / scale_);
    off += v.size();
  }
  if (params_.fisher_clip > 0) {  // the second half: Fisher weights, sent scaled by value_range / vmax
    const double back = protocol::SecAggFisherMax(params_) / params_.value_range;
    for (const auto& [name, v] : layout_) {
      std::vector<float>& t = out.fisher_sum[name];
      t.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) t[i] = static_cast<float>(res.sum[off + i] / scale_ * back);
      off += v.size();
    }
  }
  for (int u : res.survivors) {
    out.survivors.push_back(names_[static_cast<size_t>(u)]);
    out.total_weight += weights_[u].first;
    out.num_examples += weights_[u].second;
  }
  out.tampered = res.tampered;
  if (!params_.shares.empty()) {
    for (const auto& [name, v] : layout_) out.value_weight[name].assign(v.size(), 0.0f);
    // Summed per distinct share first (a fleet has few), then one coverage map per share.
    std::vector<std::pair<protocol::SecureShare, double>> by_share;
    for (int u : res.survivors) {
      protocol::SecureShare share = params_.shares[static_cast<size_t>(u)];
      if (!by_component_) share.rank = share.first = 0;
      auto it = std::find_if(by_share.begin(), by_share.end(), [&](const auto& e) { return e.first == share; });
      if (it == by_share.end()) it = by_share.insert(by_share.end(), {share, 0.0});
      it->second += weights_[u].first;
    }
    for (const auto& [share, weight] : by_share) {
      FT_ASSIGN_OR_RETURN(const aggregation::TensorMap cov, protocol::ShareCoverage(share, layout_, full_share_));
      const float w = static_cast<float>(weight);
      for (auto& [name, vw] : out.value_weight) {
        const std::vector<float>& c = cov.at(name);
        for (size_t i = 0; i < vw.size(); ++i) vw[i] += w * c[i];
      }
    }
  }
  return out;
}

}  // namespace fedtune::federation
