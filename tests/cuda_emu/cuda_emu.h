// A CPU stand-in for the few CUDA features scan_cuda.cu and ssd_cuda.cu use, so that its kernels' indexing, chunking,
// L-split and decode-step logic run (slowly) where no GPU is: every block of a launch runs in turn,
// its threads as std::threads, __syncthreads as a std::barrier, __shared__ as a static (one block
// at a time), warp shuffles through a block-wide buffer. Math is the header's host path (polynomial
// exp2), not the SFU's. Test-only; see test_scan_cuda_emulated.py.
#pragma once
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "mq_selective_scan.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<> *emu_barrier = nullptr;
inline float emu_shuffle[1024];

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu_shuffle[threadIdx.x] = v;
  __syncthreads();
  const float r = emu_shuffle[threadIdx.x ^ static_cast<unsigned>(lane_mask)];
  __syncthreads();
  return r;
}

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
  float f;
  if (e == 0) {
    f = static_cast<float>(m) * (1.f / 16777216.f);
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
  memcpy(&f, &bits, 4);
  return f;
}
inline __half __float2half_rn(float f) { return __half{mq_scan::float_to_half_bits(f)}; }

typedef void *cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char *cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline const char *cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t) {
  *p = std::malloc(n);
  return *p != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeAsync(void *p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}

template <class F>
void emu_launch(dim3 grid, dim3 block, int, cudaStream_t, F body) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(block.x);
        emu_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block.x; ++t)
          threads.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(x, y, z);
            body();
          });
        for (auto &th : threads) th.join();
      }
}
