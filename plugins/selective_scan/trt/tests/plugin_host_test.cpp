/* Host-side test of the plugin glue, without TensorRT's library or a GPU: the plugin object is driven
 * the way TensorRT drives it (creator -> plugin -> type/format/shape queries -> enqueue), with
 * mq_scan_cuda / mq_scan_step_cuda replaced by the CPU implementation (same params struct), so
 * enqueue runs on host buffers. The output is compared with a direct mq_scan_cpu call whose params
 * are filled here by name, which catches any mix-up of input positions in the plugin.
 * Built and run by ../host_check.sh (with ssd_plugin_host_test.cpp, the same for the SSDScan plugin). */
#include "selective_scan_plugin.h"

#include "mq_selective_scan.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace nvinfer1;

#include "host_stubs.h"   // the CUDA library's entry points on the CPU (gWsPtr, gWsBytes: what enqueue passed)

static int gFailures = 0;
#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);       \
      ++gFailures;                                                               \
    }                                                                            \
  } while (0)

static Dims dims(std::vector<int64_t> v) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

static IPluginV3* make(IPluginCreatorV3One& creator, int32_t outDtype, float xs) {
  float s[5] = {xs, 0.02F, 0.03F, 0.04F, 0.05F};
  PluginField f[6] = {{"x_scale", &s[0], PluginFieldType::kFLOAT32, 1}, {"delta_scale", &s[1], PluginFieldType::kFLOAT32, 1},
                      {"B_scale", &s[2], PluginFieldType::kFLOAT32, 1},  {"C_scale", &s[3], PluginFieldType::kFLOAT32, 1},
                      {"z_scale", &s[4], PluginFieldType::kFLOAT32, 1},  {"out_dtype", &outDtype, PluginFieldType::kINT32, 1}};
  PluginFieldCollection fc{6, f};
  return creator.createPlugin("scan0", &fc, TensorRTPhase::kBUILD);
}

int main() {
  int32_t n = 0;
  IPluginCreatorInterface* const* creators = getCreators(n);
  CHECK(n == 2);   // SelectiveScan, SSDScan (ssd_plugin_host_test.cpp)
  auto& creator = *static_cast<IPluginCreatorV3One*>(creators[0]);
  CHECK(std::string(creator.getPluginName()) == "SelectiveScan");
  CHECK(std::string(creator.getPluginVersion()) == "1");
  CHECK(std::string(creator.getPluginNamespace()) == "mq");
  CHECK(creator.getFieldNames()->nbFields == 6);

  // bad attributes: no plugin, a message, no crash
  CHECK(make(creator, 7, 0.01F) == nullptr);
  CHECK(std::strstr(mq_scan_trt_last_error(), "out_dtype") != nullptr);
  CHECK(make(creator, 1, -1.F) == nullptr);
  CHECK(std::strstr(mq_scan_trt_last_error(), "x_scale") != nullptr);

  IPluginV3* plugin = make(creator, 1, 0.01F);
  CHECK(plugin != nullptr);
  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* run = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  CHECK(std::string(core->getPluginNamespace()) == "mq");
  CHECK(build->getNbOutputs() == 2);

  const int64_t b = 2, L = 37, D = 24, N = 16;
  DataType in[10] = {DataType::kINT8, DataType::kINT8,  DataType::kFLOAT, DataType::kINT8,  DataType::kINT8,
                     DataType::kFLOAT, DataType::kINT8, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT};
  DataType outT[2];
  CHECK(build->getOutputDataTypes(outT, 2, in, 10) == 0);
  CHECK(outT[0] == DataType::kFLOAT && outT[1] == DataType::kFLOAT);
  DataType badIn[10];
  std::memcpy(badIn, in, sizeof in);
  badIn[0] = DataType::kFLOAT;  // x arriving dequantized
  CHECK(build->getOutputDataTypes(outT, 2, badIn, 10) != 0);
  CHECK(std::strstr(mq_scan_trt_last_error(), "QuantizeLinear") != nullptr);

  std::vector<Dims> shapes = {dims({b, L, D}), dims({b, L, D}), dims({D, N}), dims({b, L, N}), dims({b, L, N}),
                              dims({D}),       dims({b, L, D}), dims({D}),    dims({D}),       dims({b, D, N})};
  DynamicPluginTensorDesc dyn[12]{};
  for (int i = 0; i < 10; ++i) {
    dyn[i].desc.dims = shapes[i];
    dyn[i].desc.type = in[i];
    dyn[i].desc.format = TensorFormat::kLINEAR;
    dyn[i].min = dyn[i].max = dyn[i].opt = shapes[i];
  }
  dyn[10].desc.dims = shapes[0];
  dyn[10].desc.type = DataType::kFLOAT;
  dyn[11].desc.dims = dims({b, D, N});
  dyn[11].desc.type = DataType::kFLOAT;
  for (int i = 0; i < 12; ++i) CHECK(build->supportsFormatCombination(i, dyn, 10, 2));
  dyn[10].desc.type = DataType::kHALF;
  CHECK(!build->supportsFormatCombination(10, dyn, 10, 2));  // out_dtype=1 -> float y only
  dyn[10].desc.type = DataType::kFLOAT;
  dyn[3].desc.format = TensorFormat::kCHW32;
  CHECK(!build->supportsFormatCombination(3, dyn, 10, 2));
  dyn[3].desc.format = TensorFormat::kLINEAR;
  CHECK(build->configurePlugin(dyn, 10, dyn + 10, 2) == 0);

  // runtime dims with -1 at build time, and a dstate above the kernel's limit in the profile
  DynamicPluginTensorDesc big[12];
  std::memcpy(big, dyn, sizeof dyn);
  big[2].desc.dims = dims({D, -1});
  big[2].max = dims({D, 300});
  CHECK(build->configurePlugin(big, 10, big + 10, 2) != 0);
  CHECK(std::strstr(mq_scan_trt_last_error(), "dstate") != nullptr);
  std::memcpy(big, dyn, sizeof dyn);
  big[4].desc.dims = dims({b, L, N + 1});  // C with the wrong dstate
  CHECK(build->configurePlugin(big, 10, big + 10, 2) != 0);
  CHECK(std::strstr(mq_scan_trt_last_error(), "input C") != nullptr);
  std::memcpy(big, dyn, sizeof dyn);
  big[5].desc.dims = dims({1, D});  // D with rank 2
  CHECK(build->configurePlugin(big, 10, big + 10, 2) != 0);

  // workspace: the largest scratch need over the profile's batch range (stub: 64 bytes a batch)
  {
    DynamicPluginTensorDesc ws[12];
    std::memcpy(ws, dyn, sizeof ws);
    ws[0].min = dims({1, L, D});
    ws[0].max = dims({5, 4 * L, D});
    CHECK(build->getWorkspaceSize(ws, 10, ws + 10, 2) == 5 * 64);
    CHECK(build->getWorkspaceSize(ws, 9, ws + 10, 2) == 0);
  }

  // serialization round trip: the fields recreate an equal plugin at run time
  PluginFieldCollection const* ser = run->getFieldsToSerialize();
  CHECK(ser->nbFields == 7);   // the six attributes and workspace_bytes
  IPluginV3* restored = creator.createPlugin("scan0", ser, TensorRTPhase::kRUNTIME);
  CHECK(restored != nullptr);
  IPluginV3* attached = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                            ->attachToContext(nullptr);
  CHECK(attached != nullptr);
  auto* rrun = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  CHECK(std::string(static_cast<IPluginV3OneBuild*>(attached->getCapabilityInterface(PluginCapabilityType::kBUILD))
                        ->getMetadataString()) == static_cast<IPluginV3OneBuild*>(build)->getMetadataString());

  // enqueue on host buffers against a direct call filled by name
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> q(-127, 127);
  std::normal_distribution<float> g(0.F, 1.F);
  auto i8 = [&](size_t n_) { std::vector<int8_t> v(n_); for (auto& e : v) e = static_cast<int8_t>(q(rng)); return v; };
  auto f32 = [&](size_t n_, float s, float o) { std::vector<float> v(n_); for (auto& e : v) e = o + s * g(rng); return v; };
  auto x = i8(b * L * D), dl = i8(b * L * D), Bq = i8(b * L * N), Cq = i8(b * L * N), z = i8(b * L * D);
  auto A = f32(D * N, 0.5F, 0.F);
  for (auto& a : A) a = -std::exp(a);
  auto Dv = f32(D, 1.F, 0.F), bias = f32(D, 0.5F, -1.F), gs = f32(D, 0.1F, 1.F), h0 = f32(b * D * N, 1.F, 0.F);
  std::vector<float> y(b * L * D), hl(b * D * N), yRef(b * L * D), hlRef(b * D * N);

  PluginTensorDesc desc[12]{};
  for (int i = 0; i < 12; ++i) desc[i] = dyn[i].desc;
  CHECK(rrun->onShapeChange(desc, 10, desc + 10, 2) == 0);
  void const* ins[10] = {x.data(), dl.data(), A.data(), Bq.data(), Cq.data(), Dv.data(), z.data(), bias.data(), gs.data(), h0.data()};
  void* outs[2] = {y.data(), hl.data()};
  CHECK(rrun->enqueue(desc, desc + 10, ins, outs, nullptr, nullptr) == 0);

  MQScanParams p;
  std::memset(&p, 0, sizeof p);
  p.batch = b; p.seqlen = L; p.dim = D; p.dstate = N;
  p.x = x.data(); p.delta = dl.data(); p.B = Bq.data(); p.C = Cq.data(); p.z = z.data();
  p.x_scale = 0.01F; p.delta_scale = 0.02F; p.B_scale = 0.03F; p.C_scale = 0.04F; p.z_scale = 0.05F;
  p.A = A.data(); p.D = Dv.data(); p.delta_bias = bias.data(); p.gate_scale = gs.data(); p.h0 = h0.data();
  p.y = yRef.data(); p.h_last = hlRef.data(); p.out_fp16 = 0;
  mq_scan_set_contiguous_strides(&p);
  CHECK(mq_scan_cpu(&p, 1) == 0);
  double maxDiff = 0, maxRef = 0;
  for (size_t i = 0; i < y.size(); ++i) { maxDiff = std::fmax(maxDiff, std::fabs(y[i] - yRef[i])); maxRef = std::fmax(maxRef, std::fabs(yRef[i])); }
  for (size_t i = 0; i < hl.size(); ++i) maxDiff = std::fmax(maxDiff, std::fabs(hl[i] - hlRef[i]));
  std::printf("enqueue vs direct mq_scan_cpu: max |diff| %.3g (max |y| %.3g)\n", maxDiff, maxRef);
  CHECK(maxDiff == 0.0);  // same kernel, same params: bit-identical unless the plugin mapped an input wrongly
  CHECK(maxRef > 0.0);

  // an empty sequence (L = 0) passes the state through: h_last = h0
  {
    PluginTensorDesc d0[12];
    std::memcpy(d0, desc, sizeof d0);
    for (int i : {0, 1, 3, 4, 6}) d0[i].dims.d[1] = 0;
    d0[10].dims.d[1] = 0;
    std::vector<float> hl0(b * D * N, -1.F);
    void* outs0[2] = {y.data(), hl0.data()};
    CHECK(rrun->enqueue(d0, d0 + 10, ins, outs0, nullptr, nullptr) == 0);
    CHECK(std::memcmp(hl0.data(), h0.data(), hl0.size() * sizeof(float)) == 0);
  }

  // a shape change to bad runtime dims is refused, with a message
  desc[9].dims = dims({b, D, N + 2});
  CHECK(rrun->onShapeChange(desc, 10, desc + 10, 2) != 0);
  CHECK(std::strstr(mq_scan_trt_last_error(), "h0") != nullptr);

  // workspace contract: enqueue uses the size getWorkspaceSize gave TensorRT at build time (serialized as
  // "workspace_bytes"), never one recomputed at run time, where the environment may plan another split
  {
    auto fieldOf = [](PluginFieldCollection const* fc, char const* name) -> PluginField const* {
      for (int32_t i = 0; i < fc->nbFields; ++i)
        if (std::strcmp(fc->fields[i].name, name) == 0) return &fc->fields[i];
      return nullptr;
    };
    desc[9].dims = dims({b, D, N});   // undo the bad shape above
    DynamicPluginTensorDesc prof[12];
    std::memcpy(prof, dyn, sizeof prof);
    prof[0].min = dims({1, L, D});
    prof[0].max = dims({5, L, D});   // the stub's plan: 64 bytes a batch row, so 320 at batch 5
    std::vector<unsigned char> ws(320);
    for (char const* buildEnv : {"auto", "0"}) {
      bool const split = std::strcmp(buildEnv, "0") != 0;
      if (split) unsetenv("MQ_SCAN_CUDA_SPLIT");
      else setenv("MQ_SCAN_CUDA_SPLIT", "0", 1);
      IPluginV3* bp = make(creator, 1, 0.01F);
      auto* bb = static_cast<IPluginV3OneBuild*>(bp->getCapabilityInterface(PluginCapabilityType::kBUILD));
      auto* br = static_cast<IPluginV3OneRuntime*>(bp->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      CHECK(bb->configurePlugin(prof, 10, prof + 10, 2) == 0);
      size_t const given = bb->getWorkspaceSize(prof, 10, prof + 10, 2);
      CHECK(given == (split ? 320U : 0U));
      PluginFieldCollection const* fc = br->getFieldsToSerialize();
      PluginField const* wf = fieldOf(fc, "workspace_bytes");
      CHECK(wf != nullptr && wf->type == PluginFieldType::kINT64 && wf->length == 1);
      if (wf != nullptr) CHECK(*static_cast<int64_t const*>(wf->data) == static_cast<int64_t>(given));
      // deserialize and run under the other setting: the run-time plan (none, or 128 bytes at batch 2) must not
      // replace what TensorRT allocated (320 bytes, or none, though TensorRT may still pass a pointer)
      if (split) setenv("MQ_SCAN_CUDA_SPLIT", "0", 1);
      else unsetenv("MQ_SCAN_CUDA_SPLIT");
      IPluginV3* rp = creator.createPlugin("scan0", fc, TensorRTPhase::kRUNTIME);
      CHECK(rp != nullptr);
      IPluginV3* ra = static_cast<IPluginV3OneRuntime*>(rp->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                          ->attachToContext(nullptr);
      auto* rr = static_cast<IPluginV3OneRuntime*>(ra->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      CHECK(rr->onShapeChange(desc, 10, desc + 10, 2) == 0);
      gWsPtr = nullptr;
      gWsBytes = 12345;
      CHECK(rr->enqueue(desc, desc + 10, ins, outs, ws.data(), nullptr) == 0);
      std::printf("workspace: built with MQ_SCAN_CUDA_SPLIT=%s, getWorkspaceSize %zu, enqueue passed %zu bytes\n",
                  buildEnv, given, gWsBytes);
      CHECK(gWsBytes == given);
      CHECK(gWsPtr == ws.data());
      delete ra;
      delete rp;
      delete bp;
    }
    unsetenv("MQ_SCAN_CUDA_SPLIT");
    // two profiles: the smaller size is kept (never more than TensorRT allocated for either)
    IPluginV3* two = make(creator, 1, 0.01F);
    auto* tb = static_cast<IPluginV3OneBuild*>(two->getCapabilityInterface(PluginCapabilityType::kBUILD));
    DynamicPluginTensorDesc small[12];
    std::memcpy(small, prof, sizeof small);
    small[0].max = dims({2, L, D});
    CHECK(tb->getWorkspaceSize(prof, 10, prof + 10, 2) == 320);
    CHECK(tb->getWorkspaceSize(small, 10, small + 10, 2) == 128);
    PluginField const* tf = fieldOf(static_cast<IPluginV3OneRuntime*>(two->getCapabilityInterface(
                                        PluginCapabilityType::kRUNTIME))->getFieldsToSerialize(), "workspace_bytes");
    CHECK(tf != nullptr && *static_cast<int64_t const*>(tf->data) == 128);
    // an engine serialized without the field (or a plugin never sized): enqueue claims no workspace
    IPluginV3* old = make(creator, 1, 0.01F);
    IPluginV3* oa = static_cast<IPluginV3OneRuntime*>(old->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                        ->attachToContext(nullptr);
    gWsBytes = 12345;
    CHECK(static_cast<IPluginV3OneRuntime*>(oa->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
              ->enqueue(desc, desc + 10, ins, outs, ws.data(), nullptr) == 0);
    CHECK(gWsBytes == 0);
    delete oa;
    delete old;
    delete two;
  }

  delete attached;
  delete restored;
  delete plugin;
  if (gFailures) {
    std::fprintf(stderr, "%d check(s) failed\n", gFailures);
    return 1;
  }
  std::printf("OK: plugin host test passed\n");
  return 0;
}
