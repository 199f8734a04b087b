// c10d for pso: a Gloo or NCCL process group from a TCPStore rendezvous (torchrun's MASTER_ADDR /
// MASTER_PORT contract) and the collectives a data-parallel learner needs, behind a C ABI.
// NCCL is compiled in when build.rs finds the CUDA and NCCL headers (PSO_WITH_NCCL).
// Compiled against the headers of the libtorch that pso links; every call catches what libtorch
// throws and hands the message back, so no C++ exception crosses into Rust.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef PSO_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

char* message_of(const std::exception& e) {
  return strdup(e.what());
}

// Runs `body`, turning an exception into 1 and its message in `*error`.
template <typename F>
int guarded(char** error, F body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    *error = message_of(e);
  } catch (...) {
    *error = strdup("unknown C++ exception");
  }
  return 1;
}

// The rendezvous: rank 0 hosts the store, every rank connects and waits for the others.
c10::intrusive_ptr<c10d::Store> rendezvous(
    const char* host,
    uint16_t port,
    int rank,
    int world_size,
    std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions store_options;
  store_options.port = port;
  store_options.isServer = rank == 0;
  store_options.numWorkers = world_size;
  store_options.waitWorkers = true;
  store_options.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(host, store_options);
}

} // namespace

extern "C" {

void* pso_c10d_gloo_new(
    const char* host,
    uint16_t port,
    int rank,
    int world_size,
    int64_t timeout_ms,
    char** error) {
  Group* group = nullptr;
  guarded(error, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = rendezvous(host, port, rank, world_size, timeout);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
        store, rank, world_size, options);
    group = new Group{store, backend, timeout};
  });
  return group;
}

void* pso_c10d_nccl_new(
    const char* host,
    uint16_t port,
    int rank,
    int world_size,
    int64_t timeout_ms,
    int device_index,
    char** error) {
#ifdef PSO_WITH_NCCL
  Group* group = nullptr;
  guarded(error, [&] {
    // A collective that fails or times out throws from wait() (our error path) instead of the
    // watchdog tearing the process down; a user's own setting wins.
    setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = rendezvous(host, port, rank, world_size, timeout);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        store, rank, world_size, options);
    // This rank's GPU, for the collectives (barrier) that have no tensor to say it.
    backend->setBoundDeviceId(
        at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)));
    group = new Group{store, backend, timeout};
  });
  return group;
#else
  (void)host;
  (void)port;
  (void)rank;
  (void)world_size;
  (void)timeout_ms;
  (void)device_index;
  *error = strdup(
      "this pso was built without the CUDA and NCCL headers, so it has no NCCL process "
      "group: run scripts/setup.sh (it installs them) and rebuild, or set "
      "PSO_DIST_BACKEND=gloo");
  return nullptr;
#endif
}

int pso_c10d_all_reduce_sum(void* group, void* tensor, char** error) {
  return guarded(error, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = g->timeout;
    g->backend->allreduce(tensors, options)->wait(g->timeout);
  });
}

int pso_c10d_broadcast(void* group, void* tensor, int root, char** error) {
  return guarded(error, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = g->timeout;
    g->backend->broadcast(tensors, options)->wait(g->timeout);
  });
}

int pso_c10d_barrier(void* group, char** error) {
  return guarded(error, [&] {
    auto* g = static_cast<Group*>(group);
    c10d::BarrierOptions options;
    options.timeout = g->timeout;
    g->backend->barrier(options)->wait(g->timeout);
  });
}

// Adds `delta` to the store's counter `key` and returns the sum in `*value` (delta 0 reads it).
// The heartbeats that name a lost rank are such counters.
int pso_c10d_store_add(
    void* group,
    const char* key,
    int64_t delta,
    int64_t* value,
    char** error) {
  return guarded(error, [&] {
    auto* g = static_cast<Group*>(group);
    *value = g->store->add(key, delta);
  });
}

int pso_c10d_has_nccl() {
#ifdef PSO_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

void pso_c10d_free(void* group) {
  delete static_cast<Group*>(group);
}

void pso_c10d_free_error(char* error) {
  free(error);
}

} // extern "C"
