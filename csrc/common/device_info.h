#pragma once

namespace flashseek {
// Number of streaming multiprocessors of `device`, cached after the first query.
int device_sm_count(int device);
}  // namespace flashseek
