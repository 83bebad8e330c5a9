// Fault injection for drills and tests: FEDTUNE_FAULT=<point>:<round> makes the process kill
// itself with SIGKILL (as `kill -9` would) when it reaches that point in that round. Points:
//   after-dispatch        the coordinator published the round's tasks
//   during-unmask         the coordinator asked the survivors of a secure round to unmask
//   before-ledger-commit  the round's state file is written, its ledger row is not
// Unset (production): nothing happens; the check is one comparison.
#pragma once

namespace fedtune {

void MaybeCrash(const char* point, int round);

}  // namespace fedtune
