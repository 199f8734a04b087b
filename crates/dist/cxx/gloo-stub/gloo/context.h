// See algorithm.h: a stand-in for the Gloo header the PyTorch wheel does not ship. The one
// member ProcessGroupGloo.hpp calls inline is declared with Gloo's signature; libtorch_cpu
// exports its definition.
#pragma once

#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
