// `fedtune provision`: the credentials of a deployment, made with OpenSSL.
//   DIR/ca.pem, ca.key                      a private CA (ECDSA P-256, 10 years)
//   DIR/coordinator.pem, coordinator.key    server certificate (serverAuth; SANs: the given
//                                           host names / IP addresses, plus localhost and
//                                           127.0.0.1)
//   DIR/workers/NAME.pem, NAME.key          one client certificate per worker (clientAuth,
//                                           CN = NAME)
//   DIR/workers/NAME.token                  the worker's join token (32 random bytes, hex)
//   DIR/tokens.sha256                       "NAME SHA256(token)" lines for the coordinator
// Keys are written with mode 0600, everything atomically. An existing CA is reused (new
// workers can be added later); `force` replaces it.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace fedtune::coordinator {

struct ProvisionOptions {
  std::string dir;
  std::vector<std::string> hosts;    // coordinator DNS names or IP addresses
  std::vector<std::string> workers;  // worker names: [A-Za-z0-9_.-]+
  int valid_days = 365;
  bool force = false;
};

struct ProvisionReport {
  bool created_ca = false;
  std::vector<std::string> files;
};

absl::StatusOr<ProvisionReport> Provision(const ProvisionOptions& o);

// `fedtune provision -o DIR --revoke NAME`: NAME is added to DIR/revoked.txt and its line removed
// from DIR/tokens.sha256 (both atomically). A running coordinator re-reads both files within a
// second and refuses every RPC of that worker from then on (PERMISSION_DENIED). Revocation is by
// name (the certificate CN): the name stays refused; give a replacement machine a new name.
absl::Status Revoke(const std::string& dir, const std::string& name);

// Checks that `cert_pem` chains to `ca_pem` and is valid now; returns its subject CN.
absl::StatusOr<std::string> VerifyCertificate(const std::string& ca_pem, const std::string& cert_pem);

}  // namespace fedtune::coordinator
