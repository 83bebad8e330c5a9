#include "protocol/secagg_wire.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace fedtune::protocol {
namespace {

absl::Status KeyFrom(const std::string& bytes, const char* what, privacy::secagg::Key32* out) {
  if (bytes.size() != out->size()) return absl::InvalidArgumentError(absl::StrCat("secure aggregation: ", what, " must be 32 bytes"));
  std::memcpy(out->data(), bytes.data(), out->size());
  return absl::OkStatus();
}

std::string Bytes(const privacy::secagg::Key32& k) { return std::string(reinterpret_cast<const char*>(k.data()), k.size()); }

void ToProto(int owner, const privacy::Share& s, rpc::v1::SecAggShamir* p) {
  p->set_owner(owner);
  p->set_x(s.x);
  for (uint64_t limb : s.y) p->add_y(limb);
}

absl::Status FromProto(const rpc::v1::SecAggShamir& p, std::map<int, privacy::Share>* out) {
  privacy::Share s;
  if (p.y_size() != static_cast<int>(s.y.size()) || p.x() == 0) return absl::InvalidArgumentError("secure aggregation: malformed share");
  s.x = p.x();
  for (size_t i = 0; i < s.y.size(); ++i) s.y[i] = p.y(static_cast<int>(i));
  if (!out->emplace(p.owner(), s).second) return absl::InvalidArgumentError("secure aggregation: two shares for one owner");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<privacy::secagg::Config> SecAggConfig(const TrainTask::Secure& s, size_t vector_length) {
  privacy::secagg::Config c;
  const int n = s.clients;
  c.num_clients = n;
  c.degree = s.degree > 0 ? s.degree : std::max(2, 2 * static_cast<int>(std::ceil(std::log2(std::max(2, n)))));
  if (c.degree % 2 && c.degree < n - 1) ++c.degree;
  c.threshold = s.threshold;
  c.graph_seed = s.graph_seed;
  c.vector_length = vector_length;
  FT_RETURN_IF_ERROR(privacy::secagg::Validate(c));
  if (!(s.value_range > 0)) return absl::InvalidArgumentError("secure aggregation: value_range must be > 0");
  if (s.id < 0 || s.id >= n) return absl::InvalidArgumentError(absl::StrCat("secure aggregation: id ", s.id, " outside [0, ", n, ")"));
  return c;
}

double SecAggScale(const privacy::secagg::Config& c, double value_range) { return c.clip_range / value_range; }

size_t SecAggVectorLength(const TrainTask::Secure& s, size_t adapter_values) { return s.fisher_clip > 0 ? 2 * adapter_values : adapter_values; }

double SecAggFisherMax(const TrainTask::Secure& s) { return 1.0 + s.fisher_lambda / s.fisher_clip; }

rpc::v1::SecAggKeys ToProto(const privacy::secagg::PublicKeys& k) {
  rpc::v1::SecAggKeys p;
  p.set_id(k.id);
  p.set_enc_pk(Bytes(k.enc_pk));
  p.set_mask_pk(Bytes(k.mask_pk));
  p.set_b_commitment(Bytes(k.b_commitment));
  return p;
}

absl::StatusOr<privacy::secagg::PublicKeys> FromProto(const rpc::v1::SecAggKeys& p) {
  privacy::secagg::PublicKeys k;
  k.id = p.id();
  FT_RETURN_IF_ERROR(KeyFrom(p.enc_pk(), "enc_pk", &k.enc_pk));
  FT_RETURN_IF_ERROR(KeyFrom(p.mask_pk(), "mask_pk", &k.mask_pk));
  FT_RETURN_IF_ERROR(KeyFrom(p.b_commitment(), "b_commitment", &k.b_commitment));
  return k;
}

rpc::v1::SecAggShare ToProto(const privacy::secagg::EncryptedShare& s) {
  rpc::v1::SecAggShare p;
  p.set_from(s.from);
  p.set_to(s.to);
  p.set_ciphertext(std::string(s.ciphertext.begin(), s.ciphertext.end()));
  return p;
}

privacy::secagg::EncryptedShare FromProto(const rpc::v1::SecAggShare& p) {
  return {p.from(), p.to(), std::vector<uint8_t>(p.ciphertext().begin(), p.ciphertext().end())};
}

rpc::v1::SecAggUnmask ToProto(const privacy::secagg::UnmaskReply& r) {
  rpc::v1::SecAggUnmask p;
  p.set_from(r.from);
  for (const auto& [owner, s] : r.mask_key_shares) ToProto(owner, s, p.add_mask_key_shares());
  for (const auto& [owner, s] : r.self_mask_shares) ToProto(owner, s, p.add_self_mask_shares());
  return p;
}

absl::StatusOr<privacy::secagg::UnmaskReply> FromProto(const rpc::v1::SecAggUnmask& p) {
  privacy::secagg::UnmaskReply r;
  r.from = p.from();
  for (const auto& s : p.mask_key_shares()) FT_RETURN_IF_ERROR(FromProto(s, &r.mask_key_shares));
  for (const auto& s : p.self_mask_shares()) FT_RETURN_IF_ERROR(FromProto(s, &r.self_mask_shares));
  return r;
}

std::vector<uint8_t> EncodeMasked(std::span<const uint32_t> y) {
  std::vector<uint8_t> b(y.size() * 4);
  for (size_t i = 0; i < y.size(); ++i)
    for (int j = 0; j < 4; ++j) b[4 * i + static_cast<size_t>(j)] = static_cast<uint8_t>(y[i] >> (8 * j));
  return b;
}

absl::StatusOr<std::vector<uint32_t>> DecodeMasked(std::span<const uint8_t> bytes, size_t expected_words) {
  if (bytes.size() != expected_words * 4)
    return absl::InvalidArgumentError(absl::StrCat("masked input of ", bytes.size(), " bytes, expected ", expected_words * 4));
  std::vector<uint32_t> y(expected_words);
  for (size_t i = 0; i < y.size(); ++i)
    y[i] = static_cast<uint32_t>(bytes[4 * i]) | static_cast<uint32_t>(bytes[4 * i + 1]) << 8 | static_cast<uint32_t>(bytes[4 * i + 2]) << 16 |
           static_cast<uint32_t>(bytes[4 * i + 3]) << 24;
  return y;
}

}  // namespace fedtune::protocol
