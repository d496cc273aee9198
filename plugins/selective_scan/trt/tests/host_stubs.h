/* The CUDA library's entry points and the CUDA runtime calls the plugins make, on the CPU, for the host tests
 * (plugin_host_test.cpp, ssd_plugin_host_test.cpp): the kernels are the CPU library's (same params structs), the
 * device memory is host memory. Included once per test program. What enqueue handed the library as scratch is
 * recorded in gWsPtr / gWsBytes. */
#pragma once

#include <cstdlib>
#include <cstring>

#include "mq_selective_scan.h"
#include "mq_ssd.h"

static void* gWsPtr = nullptr;
static size_t gWsBytes = 0;
static int gStepCalls = 0;   // the decode-step entry points called

extern "C" int mq_scan_cuda(const MQScanParams* p, void*) noexcept { return mq_scan_cpu(p, 1); }
extern "C" int mq_scan_step_cuda(const MQScanParams* p, void*) noexcept {
  ++gStepCalls;
  return mq_scan_cpu(p, 1);
}
extern "C" int mq_scan_cuda_ws(const MQScanParams* p, void* ws, size_t bytes, void*) noexcept {
  gWsPtr = ws;
  gWsBytes = bytes;
  return mq_scan_cpu(p, 1);
}
// 64 bytes a batch row, and none when MQ_SCAN_CUDA_SPLIT=0 turns the split off: environment-dependent, as the
// real library's plan is
extern "C" size_t mq_scan_cuda_workspace_size(const MQScanParams* p) noexcept {
  char const* split = std::getenv("MQ_SCAN_CUDA_SPLIT");
  return split != nullptr && split[0] == '0' ? 0 : static_cast<size_t>(p->batch) * 64;
}

extern "C" int mq_ssd_cuda_ws(const MQSSDParams* p, void* ws, size_t bytes, void*) noexcept {
  gWsPtr = ws;
  gWsBytes = bytes;
  return mq_ssd_cpu(p, 1);
}
extern "C" int mq_ssd_step_cuda(const MQSSDParams* p, void*) noexcept {
  ++gStepCalls;
  return mq_ssd_cpu(p, 1);
}
extern "C" size_t mq_ssd_cuda_workspace_size(const MQSSDParams* p) noexcept {   // as the Mamba1 stub
  char const* split = std::getenv("MQ_SCAN_CUDA_SPLIT");
  return split != nullptr && split[0] == '0' ? 0 : static_cast<size_t>(p->batch) * 64;
}

extern "C" nvinfer1::IPluginRegistry* getPluginRegistry() noexcept { return nullptr; }
static int gMallocs = 0;   // live device allocations
extern "C" cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n);
  if (*p != nullptr) ++gMallocs;
  return *p != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
extern "C" cudaError_t cudaFree(void* p) {
  if (p != nullptr) --gMallocs;
  std::free(p);
  return cudaSuccess;
}
extern "C" cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind) {
  std::memcpy(dst, src, count);
  return cudaSuccess;
}
// enqueue's seqlen == 0 pass-through and the per-channel scales' workspace copy: host memory here
extern "C" cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, count);
  return cudaSuccess;
}
extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
