// Signed SecAgg+ key advertisements (issue 17): a coordinator relays every worker's public keys,
// so one that swapped a key for its own could decrypt shares and unmask inputs. Each worker
// signs its advertisement with the private key of its deployment certificate (the one
// `fedtune provision` made and mutual TLS already uses), over the round attempt (run, round,
// the attempt's deadline, clients, graph seed: an advertisement of an aborted attempt cannot be
// replayed into another), its SecAgg id and the three public values, and attaches the
// certificate; every receiver checks that the certificate chains to the deployment CA and is a
// worker (client-authentication) certificate, not the coordinator's server certificate, and that
// the signature fits, and refuses the round otherwise. The coordinator cannot forge a worker's
// signature, so a swapped key is detected.
// (Identities are certificates: a coordinator that also holds the CA key could mint workers; the
// CA key belongs offline, which `fedtune provision` says.)
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "proto/service.pb.h"

namespace fedtune::protocol {

class SecAggIdentity {
 public:
  // PEM file paths: the deployment CA, this worker's certificate and private key.
  static absl::StatusOr<std::unique_ptr<SecAggIdentity>> Load(const std::string& ca_pem, const std::string& cert_pem, const std::string& key_pem);
  ~SecAggIdentity();
  // Adds the signature and certificate to `k` (the keys this worker advertises in the attempt
  // `context`, from SecAggAttempt).
  absl::Status Sign(const std::string& context, rpc::v1::SecAggKeys* k) const;
  // Checks a neighbour's advertisement; returns its certificate's common name.
  absl::StatusOr<std::string> Verify(const std::string& context, const rpc::v1::SecAggKeys& k) const;
  const std::string& name() const { return name_; }

 private:
  SecAggIdentity() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string name_;
};

// The round attempt a secure task belongs to (the same for every worker in it, new per attempt).
std::string SecAggAttempt(const rpc::v1::Task& task);
// The bytes an advertisement signature covers.
std::string SecAggSignedBytes(const std::string& context, const rpc::v1::SecAggKeys& k);

}  // namespace fedtune::protocol
