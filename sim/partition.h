// Splitting a pooled training set across simulated clients (ALGORITHMS-independent, standard
// federated benchmarks): IID, Dirichlet(alpha) over task labels (Hsu et al. 2019), one task per
// client, and size skew. Deterministic given the Rng.
#pragma once

#include <cstdint>
#include <vector>

#include "common/rng.h"
#include "common/status.h"

namespace fedtune::sim {

enum class PartitionKind { kIid, kDirichlet, kByTask, kSizeSkew };

// labels[i] = task of example i (0..num_tasks-1). Returns per client the example indices; every
// client gets at least one example (InvalidArgument when there are fewer examples than
// clients, or a task-based split cannot give every client data).
absl::StatusOr<std::vector<std::vector<size_t>>> Partition(const std::vector<int>& labels, int num_tasks, int clients, PartitionKind kind,
                                                           double alpha, double skew, Rng& rng);

// Gamma(shape, 1) sample (Marsaglia-Tsang), used for Dirichlet draws.
double SampleGamma(double shape, Rng& rng);

}  // namespace fedtune::sim
