// See ../algorithm.h: a stand-in for the Gloo header the PyTorch wheel does not ship.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
} // namespace gloo
