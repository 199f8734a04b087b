// See ../algorithm.h: a stand-in for the Gloo header the PyTorch wheel does not ship.
// ProcessGroupGloo.hpp derives GlooStore from this interface inline; pso never instantiates
// GlooStore (libtorch's own, compiled with the real interface, is the one that runs), so only
// the overridden signatures must exist here.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) = 0;
};
} // namespace rendezvous
} // namespace gloo
