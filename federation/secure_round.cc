#include "federation/secure_round.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace fedtune::federation {

absl::StatusOr<std::unique_ptr<SecureRound>> SecureRound::Begin(const std::vector<std::string>& clients, const aggregation::TensorMap& layout,
                                                                double value_range, int degree, int threshold, uint64_t graph_seed) {
  std::unique_ptr<SecureRound> r(new SecureRound());
  const int n = static_cast<int>(clients.size());
  r->cfg_.num_clients = n;
  r->cfg_.degree = degree > 0 ? degree : std::max(2, 2 * static_cast<int>(std::ceil(std::log2(std::max(2, n)))));
  if (r->cfg_.degree % 2 && r->cfg_.degree < n - 1) ++r->cfg_.degree;
  r->cfg_.threshold = threshold;
  r->cfg_.graph_seed = graph_seed;
  for (const auto& [name, v] : layout) r->cfg_.vector_length += v.size();
  FT_RETURN_IF_ERROR(privacy::secagg::Validate(r->cfg_));
  if (!(value_range > 0)) return absl::InvalidArgumentError("secure_aggregation.value_range must be > 0");
  r->scale_ = r->cfg_.clip_range / value_range;
  r->layout_ = layout;
  r->names_ = clients;
  r->server_ = std::make_unique<privacy::secagg::Server>(r->cfg_);
  FT_ASSIGN_OR_RETURN(r->rounding_, privacy::NoiseSource::Create());
  for (int i = 0; i < n; ++i) {
    FT_ASSIGN_OR_RETURN(auto c, privacy::secagg::Client::Create(r->cfg_, i));
    FT_RETURN_IF_ERROR(r->server_->ReceiveKeys(c->Advertise()));
    r->clients_.push_back(std::move(c));
  }
  for (auto& c : r->clients_) {
    FT_ASSIGN_OR_RETURN(auto shares, c->ShareKeys(r->server_->KeysFor(c->id())));
    for (const auto& s : shares) r->bytes_ += static_cast<int64_t>(s.ciphertext.size());
    FT_RETURN_IF_ERROR(r->server_->ReceiveShares(c->id(), shares));
  }
  r->bytes_ += static_cast<int64_t>(n * sizeof(privacy::secagg::PublicKeys));
  return r;
}

absl::Status SecureRound::Submit(const std::string& client, const aggregation::TensorMap& weighted) {
  auto it = std::find(names_.begin(), names_.end(), client);
  if (it == names_.end()) return absl::NotFoundError(absl::StrCat("secure round: ", client, " is not in this round"));
  const int id = static_cast<int>(it - names_.begin());
  std::vector<float> flat;
  flat.reserve(cfg_.vector_length);
  for (const auto& [name, v] : layout_) {
    auto w = weighted.find(name);
    for (size_t i = 0; i < v.size(); ++i) {
      const float x = w == weighted.end() ? 0.0f : static_cast<float>(w->second[i] * scale_);
      if (std::fabs(x) > cfg_.clip_range) ++clamped_;
      flat.push_back(x);
    }
  }
  FT_ASSIGN_OR_RETURN(auto y, clients_[static_cast<size_t>(id)]->MaskedInput(flat, server_->SharesFor(id), *rounding_));
  bytes_ += static_cast<int64_t>(y.size() * sizeof(uint32_t));
  ++submitted_;
  return server_->ReceiveMasked(id, std::move(y));
}

absl::StatusOr<SecureRound::Sum> SecureRound::Finish() {
  const auto dropped = server_->Dropped(), survivors = server_->Survivors();
  for (int u : survivors) {
    FT_ASSIGN_OR_RETURN(auto reply, clients_[static_cast<size_t>(u)]->Unmask(dropped, survivors));
    bytes_ += static_cast<int64_t>((reply.mask_key_shares.size() + reply.self_mask_shares.size()) * sizeof(privacy::Share));
    FT_RETURN_IF_ERROR(server_->ReceiveUnmask(reply));
  }
  FT_ASSIGN_OR_RETURN(privacy::secagg::Result res, server_->Finish());
  Sum out;
  size_t off = 0;
  for (const auto& [name, v] : layout_) {
    std::vector<float>& t = out.sum[name];
    t.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) t[i] = static_cast<float>(res.sum[off + i] / scale_);
    off += v.size();
  }
  for (int u : res.survivors) out.survivors.push_back(names_[static_cast<size_t>(u)]);
  out.tampered = res.tampered;
  out.clamped = clamped_;
  return out;
}

}  // namespace fedtune::federation
