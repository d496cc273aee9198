/* Host-side test of the SSDScan plugin glue, without TensorRT's library or a GPU: the plugin object is driven the
 * way TensorRT drives it (creator -> plugin -> type/format/shape queries -> serialization -> attachToContext ->
 * enqueue), with the CUDA entry points replaced by the CPU implementation (host_stubs.h: same MQSSDParams, host
 * memory for "device" memory). enqueue's outputs are compared bit for bit with a direct mq_ssd_cpu call whose
 * params are filled here by name, which catches any mix-up of input positions or scales in the plugin.
 * Built and run by ../host_check.sh. */
#include "selective_scan_plugin.h"
#include "ssd_scan_plugin.h"

#include "mq_ssd.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace nvinfer1;

#include "host_stubs.h"

static int gFailures = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++gFailures;                                                         \
    }                                                                      \
  } while (0)

static Dims dims(std::vector<int64_t> v) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

// the sizes of every plugin below: 4 heads of 12 channels, 2 groups of 16 states
constexpr int32_t H = 4, P = 12, G = 2, N = 16;

struct Attrs {
  std::vector<float> scale[4] = {{0.02F}, {0.015F}, {0.03F}, {0.025F}};
  int32_t heads = H, head_dim = P, groups = G, d_state = N, chunk = 16;
  float dt_min = 0.F, dt_max = std::numeric_limits<float>::infinity();
};

static IPluginV3* make(IPluginCreatorV3One& creator, Attrs const& a, char const* skip = nullptr) {
  std::vector<PluginField> f;
  char const* names[4] = {"x_scale", "dt_scale", "B_scale", "C_scale"};
  for (int i = 0; i < 4; ++i)
    f.emplace_back(names[i], a.scale[i].data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(a.scale[i].size()));
  f.emplace_back("heads", &a.heads, PluginFieldType::kINT32, 1);
  f.emplace_back("head_dim", &a.head_dim, PluginFieldType::kINT32, 1);
  f.emplace_back("groups", &a.groups, PluginFieldType::kINT32, 1);
  f.emplace_back("d_state", &a.d_state, PluginFieldType::kINT32, 1);
  f.emplace_back("chunk", &a.chunk, PluginFieldType::kINT32, 1);
  f.emplace_back("dt_min", &a.dt_min, PluginFieldType::kFLOAT32, 1);
  f.emplace_back("dt_max", &a.dt_max, PluginFieldType::kFLOAT32, 1);
  if (skip != nullptr)
    for (size_t i = 0; i < f.size(); ++i)
      if (std::strcmp(f[i].name, skip) == 0) f.erase(f.begin() + static_cast<long>(i));
  PluginFieldCollection fc{static_cast<int32_t>(f.size()), f.data()};
  return creator.createPlugin("ssd0", &fc, TensorRTPhase::kBUILD);
}

template <class T>
static T* cap(IPluginV3* p, PluginCapabilityType t) {
  return static_cast<T*>(p->getCapabilityInterface(t));
}

struct Buffers {
  int64_t b, L;
  std::vector<int8_t> x, dt, Bq, Cq;
  std::vector<float> A, D, bias, h0, y, hl;
};

static Buffers buffers(int64_t b, int64_t L, std::mt19937& rng) {
  std::uniform_int_distribution<int> q(-128, 127);
  std::normal_distribution<float> g(0.F, 1.F);
  auto i8 = [&](size_t n) { std::vector<int8_t> v(n); for (auto& e : v) e = static_cast<int8_t>(q(rng)); return v; };
  auto f32 = [&](size_t n, float s, float o) { std::vector<float> v(n); for (auto& e : v) e = o + s * g(rng); return v; };
  Buffers r{b, L, i8(b * L * H * P), i8(b * L * H), i8(b * L * G * N), i8(b * L * G * N), f32(H, 0.5F, 0.F),
            f32(H, 1.F, 0.F), f32(H, 0.5F, -1.F), f32(b * H * P * N, 1.F, 0.F), {}, {}};
  for (auto& a : r.A) a = -std::exp(a);
  r.bias[0] = 24.F;   // softplus's linear range on one head
  r.y.assign(b * L * H * P, -1.F);
  r.hl.assign(b * H * P * N, -1.F);
  return r;
}

static void descs(Buffers const& t, PluginTensorDesc* d) {
  std::vector<Dims> s = {dims({t.b, t.L, H * P}), dims({t.b, t.L, H}), dims({H}),    dims({t.b, t.L, G * N}),
                         dims({t.b, t.L, G * N}), dims({H}),           dims({H}),    dims({t.b, H, P, N}),
                         dims({t.b, t.L, H * P}), dims({t.b, H, P, N})};
  DataType const types[10] = {DataType::kINT8, DataType::kINT8,  DataType::kFLOAT, DataType::kINT8, DataType::kINT8,
                              DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT};
  for (int i = 0; i < 10; ++i) {
    d[i] = PluginTensorDesc{};
    d[i].dims = s[i];
    d[i].type = types[i];
    d[i].format = TensorFormat::kLINEAR;
  }
}

/* enqueue on host buffers, then the same scan through a direct mq_ssd_cpu call filled by name: 0 when bitwise equal */
static double enqueueVsDirect(IPluginV3OneRuntime* run, Attrs const& a, Buffers& t, void* ws, double* maxRef) {
  PluginTensorDesc d[10];
  descs(t, d);
  CHECK(run->onShapeChange(d, 8, d + 8, 2) == 0);
  void const* ins[8] = {t.x.data(), t.dt.data(), t.A.data(), t.Bq.data(), t.Cq.data(), t.D.data(), t.bias.data(),
                        t.h0.data()};
  void* outs[2] = {t.y.data(), t.hl.data()};
  CHECK(run->enqueue(d, d + 8, ins, outs, ws, nullptr) == 0);

  std::vector<float> yRef(t.y.size()), hRef(t.hl.size());
  MQSSDParams p;
  std::memset(&p, 0, sizeof p);
  p.batch = t.b, p.seqlen = t.L, p.heads = H, p.head_dim = P, p.groups = G, p.dstate = N;
  p.x = t.x.data(), p.dt = t.dt.data(), p.B = t.Bq.data(), p.C = t.Cq.data();
  float* value[4] = {&p.x_scale, &p.dt_scale, &p.B_scale, &p.C_scale};
  float const** array[4] = {&p.x_scales, &p.dt_scales, &p.B_scales, &p.C_scales};
  for (int i = 0; i < 4; ++i) {
    if (a.scale[i].size() == 1) *value[i] = a.scale[i][0];
    else *array[i] = a.scale[i].data();
  }
  p.A = t.A.data(), p.D = t.D.data(), p.dt_bias = t.bias.data(), p.dt_min = a.dt_min, p.dt_max = a.dt_max;
  p.h0 = t.h0.data(), p.y = yRef.data(), p.h_last = hRef.data();
  mq_ssd_set_contiguous_strides(&p);
  CHECK(mq_ssd_cpu(&p, 1) == 0);
  double diff = 0, ref = 0;
  for (size_t i = 0; i < yRef.size(); ++i) {
    diff = std::fmax(diff, std::fabs(t.y[i] - yRef[i]));
    ref = std::fmax(ref, std::fabs(yRef[i]));
  }
  for (size_t i = 0; i < hRef.size(); ++i) diff = std::fmax(diff, std::fabs(t.hl[i] - hRef[i]));
  *maxRef = ref;
  return diff;
}

static PluginField const* fieldOf(PluginFieldCollection const* fc, char const* name) {
  for (int32_t i = 0; i < fc->nbFields; ++i)
    if (std::strcmp(fc->fields[i].name, name) == 0) return &fc->fields[i];
  return nullptr;
}

int main() {
  int32_t n = 0;
  IPluginCreatorInterface* const* creators = getCreators(n);
  CHECK(n == 2);
  auto& creator = *static_cast<IPluginCreatorV3One*>(creators[1]);
  CHECK(std::string(creator.getPluginName()) == "SSDScan");
  CHECK(std::string(creator.getPluginVersion()) == "1");
  CHECK(std::string(creator.getPluginNamespace()) == "mq");
  CHECK(creator.getFieldNames()->nbFields == 11);

  // bad attributes: no plugin, a message naming the attribute, no crash
  {
    struct Case {
      char const* what;
      Attrs a;
      char const* skip;
    };
    std::vector<Case> cases(7);
    cases[0] = {"x_scale", {}, nullptr};
    cases[0].a.scale[0] = {0.1F, 0.2F, 0.3F};   // neither 1 nor heads * head_dim values
    cases[1] = {"B_scale", {}, nullptr};
    cases[1].a.scale[2] = {std::nanf("")};
    cases[2] = {"groups", {}, nullptr};
    cases[2].a.groups = 3;                      // 4 heads are not a multiple of 3 groups
    cases[3] = {"d_state", {}, nullptr};
    cases[3].a.d_state = 300;
    cases[4] = {"dt_max", {}, nullptr};
    cases[4].a.dt_max = 0.F;
    cases[5] = {"dt_scale", {}, "dt_scale"};    // missing
    cases[6] = {"heads", {}, nullptr};
    cases[6].a.heads = 0;
    for (auto const& c : cases) {
      CHECK(make(creator, c.a, c.skip) == nullptr);
      bool const named = std::strstr(mq_scan_trt_last_error(), c.what) != nullptr;
      if (!named) std::fprintf(stderr, "expected '%s' in: %s\n", c.what, mq_scan_trt_last_error());
      CHECK(named);
    }
  }

  Attrs attrs;
  IPluginV3* plugin = make(creator, attrs);
  CHECK(plugin != nullptr);
  auto* core = cap<IPluginV3OneCore>(plugin, PluginCapabilityType::kCORE);
  auto* build = cap<IPluginV3OneBuild>(plugin, PluginCapabilityType::kBUILD);
  CHECK(std::string(core->getPluginName()) == "SSDScan" && std::string(core->getPluginNamespace()) == "mq");
  CHECK(build->getNbOutputs() == 2);

  std::mt19937 rng(1234);
  Buffers t = buffers(2, 37, rng);
  PluginTensorDesc d[10];
  descs(t, d);
  DataType in[8], outT[2];
  for (int i = 0; i < 8; ++i) in[i] = d[i].type;
  CHECK(build->getOutputDataTypes(outT, 2, in, 8) == 0);
  CHECK(outT[0] == DataType::kFLOAT && outT[1] == DataType::kFLOAT);
  in[3] = DataType::kFLOAT;   // B arriving dequantized
  CHECK(build->getOutputDataTypes(outT, 2, in, 8) != 0);
  CHECK(std::strstr(mq_scan_trt_last_error(), "QuantizeLinear") != nullptr);

  DynamicPluginTensorDesc dyn[10]{};
  for (int i = 0; i < 10; ++i) {
    dyn[i].desc = d[i];
    dyn[i].min = dyn[i].max = dyn[i].opt = d[i].dims;
  }
  for (int i = 0; i < 10; ++i) CHECK(build->supportsFormatCombination(i, dyn, 8, 2));
  dyn[1].desc.type = DataType::kFLOAT;
  CHECK(!build->supportsFormatCombination(1, dyn, 8, 2));   // dt must be int8
  dyn[1].desc.type = DataType::kINT8;
  dyn[4].desc.format = TensorFormat::kCHW32;
  CHECK(!build->supportsFormatCombination(4, dyn, 8, 2));
  dyn[4].desc.format = TensorFormat::kLINEAR;
  CHECK(build->configurePlugin(dyn, 8, dyn + 8, 2) == 0);
  {   // shapes that disagree with the attributes, and runtime dims (-1) that agree with anything
    DynamicPluginTensorDesc bad[10];
    std::memcpy(bad, dyn, sizeof bad);
    bad[3].desc.dims = dims({2, 37, G * N + 1});   // B with the wrong groups * d_state
    CHECK(build->configurePlugin(bad, 8, bad + 8, 2) != 0);
    CHECK(std::strstr(mq_scan_trt_last_error(), "input B") != nullptr);
    std::memcpy(bad, dyn, sizeof bad);
    bad[7].desc.dims = dims({2, H, P * N});        // h0 of rank 3
    CHECK(build->configurePlugin(bad, 8, bad + 8, 2) != 0);
    CHECK(std::strstr(mq_scan_trt_last_error(), "h0") != nullptr);
    std::memcpy(bad, dyn, sizeof bad);
    bad[0].desc.dims = dims({-1, -1, H * P});
    bad[1].desc.dims = dims({-1, -1, H});
    CHECK(build->configurePlugin(bad, 8, bad + 8, 2) == 0);
  }

  // serialization round trip, then enqueue on the run-time clone against a direct call
  PluginFieldCollection const* ser = cap<IPluginV3OneRuntime>(plugin, PluginCapabilityType::kRUNTIME)->getFieldsToSerialize();
  CHECK(ser->nbFields == 12);   // the eleven attributes and workspace_bytes
  IPluginV3* restored = creator.createPlugin("ssd0", ser, TensorRTPhase::kRUNTIME);
  CHECK(restored != nullptr);
  IPluginV3* attached = cap<IPluginV3OneRuntime>(restored, PluginCapabilityType::kRUNTIME)->attachToContext(nullptr);
  CHECK(attached != nullptr);
  CHECK(std::string(cap<IPluginV3OneBuild>(attached, PluginCapabilityType::kBUILD)->getMetadataString()) ==
        build->getMetadataString());
  double ref = 0;
  double diff = enqueueVsDirect(cap<IPluginV3OneRuntime>(attached, PluginCapabilityType::kRUNTIME), attrs, t, nullptr, &ref);
  std::printf("per-tensor scales, L 37: enqueue vs direct mq_ssd_cpu max |diff| %.3g (max |y| %.3g)\n", diff, ref);
  CHECK(diff == 0.0 && ref > 0.0);

  // one token: the decode-step entry point
  {
    Buffers one = buffers(3, 1, rng);
    int const calls = gStepCalls;
    diff = enqueueVsDirect(cap<IPluginV3OneRuntime>(attached, PluginCapabilityType::kRUNTIME), attrs, one, nullptr, &ref);
    std::printf("decode step (L 1): max |diff| %.3g\n", diff);
    CHECK(diff == 0.0 && ref > 0.0);
    CHECK(gStepCalls == calls + 1);
  }
  // no step (L = 0): h_last = h0
  {
    Buffers zero = buffers(2, 0, rng);
    PluginTensorDesc dz[10];
    descs(zero, dz);
    void const* ins[8] = {zero.x.data(), zero.dt.data(), zero.A.data(), zero.Bq.data(), zero.Cq.data(), zero.D.data(),
                          zero.bias.data(), zero.h0.data()};
    void* outs[2] = {zero.y.data(), zero.hl.data()};
    CHECK(cap<IPluginV3OneRuntime>(attached, PluginCapabilityType::kRUNTIME)->enqueue(dz, dz + 8, ins, outs, nullptr,
                                                                                       nullptr) == 0);
    CHECK(std::memcmp(zero.hl.data(), zero.h0.data(), zero.hl.size() * sizeof(float)) == 0);
  }
  // a shape change to bad runtime dims is refused, with a message
  {
    PluginTensorDesc bad[10];
    descs(t, bad);
    bad[2].dims = dims({H + 1});
    CHECK(cap<IPluginV3OneRuntime>(attached, PluginCapabilityType::kRUNTIME)->onShapeChange(bad, 8, bad + 8, 2) != 0);
    CHECK(std::strstr(mq_scan_trt_last_error(), "input A") != nullptr);
  }

  // per-channel scales (x per channel, dt per head, B and C per state): attachToContext copies them to the device
  // (one allocation, freed with the plugin); a plugin never attached copies them into its workspace's head
  {
    Attrs pc;
    std::uniform_real_distribution<float> u(0.5F, 1.5F);
    for (int i = 0; i < 4; ++i) {
      int64_t const ch = i == 0 ? H * P : i == 1 ? H : G * N;
      pc.scale[i].resize(static_cast<size_t>(ch));
      for (auto& s : pc.scale[i]) s = attrs.scale[i][0] * u(rng);
    }
    pc.dt_max = 0.5F;   // the clamp active
    IPluginV3* bp = make(creator, pc);
    CHECK(bp != nullptr);
    int const live = gMallocs;
    IPluginV3* ctx = cap<IPluginV3OneRuntime>(bp, PluginCapabilityType::kRUNTIME)->attachToContext(nullptr);
    CHECK(ctx != nullptr && gMallocs == live + 1);
    Buffers tp = buffers(2, 37, rng);
    diff = enqueueVsDirect(cap<IPluginV3OneRuntime>(ctx, PluginCapabilityType::kRUNTIME), pc, tp, nullptr, &ref);
    std::printf("per-channel scales on the context's device copy: max |diff| %.3g (max |y| %.3g)\n", diff, ref);
    CHECK(diff == 0.0 && ref > 0.0);
    delete ctx;
    CHECK(gMallocs == live);

    // not attached: the scales go to the workspace head that getWorkspaceSize reserved (and serialized)
    auto* bb = cap<IPluginV3OneBuild>(bp, PluginCapabilityType::kBUILD);
    DynamicPluginTensorDesc prof[10];
    std::memcpy(prof, dyn, sizeof prof);
    unsetenv("MQ_SCAN_CUDA_SPLIT");
    size_t const slot = (static_cast<size_t>(H * P + H + 2 * G * N) * sizeof(float) + 255) / 256 * 256;
    size_t const given = bb->getWorkspaceSize(prof, 8, prof + 8, 2);
    CHECK(given == slot + 2 * 64);   // the slot, then the stub's split plan (64 bytes a batch row)
    std::vector<float> ws((given + sizeof(float) - 1) / sizeof(float), 0.F);
    Buffers tw = buffers(2, 37, rng);
    diff = enqueueVsDirect(cap<IPluginV3OneRuntime>(bp, PluginCapabilityType::kRUNTIME), pc, tw, ws.data(), &ref);
    std::printf("per-channel scales in the workspace: max |diff| %.3g; scratch %zu bytes after the %zu-byte slot\n",
                diff, gWsBytes, slot);
    CHECK(diff == 0.0 && ref > 0.0);
    CHECK(std::memcmp(ws.data(), pc.scale[0].data(), pc.scale[0].size() * sizeof(float)) == 0);
    CHECK(gWsPtr == reinterpret_cast<char*>(ws.data()) + slot && gWsBytes == given - slot);
    // without the workspace TensorRT was told about: refused with a message, nothing written
    PluginTensorDesc dd[10];
    descs(tw, dd);
    void const* ins[8] = {tw.x.data(), tw.dt.data(), tw.A.data(), tw.Bq.data(), tw.Cq.data(), tw.D.data(),
                          tw.bias.data(), tw.h0.data()};
    void* outs[2] = {tw.y.data(), tw.hl.data()};
    IPluginV3* fresh = make(creator, pc);   // never sized: claims no workspace
    CHECK(cap<IPluginV3OneRuntime>(fresh, PluginCapabilityType::kRUNTIME)->enqueue(dd, dd + 8, ins, outs, ws.data(),
                                                                                    nullptr) != 0);
    CHECK(std::strstr(mq_scan_trt_last_error(), "per-channel scales need") != nullptr);
    delete fresh;
    delete bp;
  }

  // workspace contract (as SelectiveScan's): enqueue hands the library the size getWorkspaceSize gave TensorRT at
  // build time (serialized as "workspace_bytes"), never one recomputed under the run-time environment
  {
    DynamicPluginTensorDesc prof[10];
    std::memcpy(prof, dyn, sizeof prof);
    prof[0].min = dims({1, 37, H * P});
    prof[0].max = dims({5, 37, H * P});   // the stub's plan: 64 bytes a batch row, so 320 at batch 5
    std::vector<unsigned char> ws(320);
    for (char const* buildEnv : {"auto", "0"}) {
      bool const split = std::strcmp(buildEnv, "0") != 0;
      if (split) unsetenv("MQ_SCAN_CUDA_SPLIT");
      else setenv("MQ_SCAN_CUDA_SPLIT", "0", 1);
      IPluginV3* bp = make(creator, attrs);
      auto* bb = cap<IPluginV3OneBuild>(bp, PluginCapabilityType::kBUILD);
      CHECK(bb->configurePlugin(prof, 8, prof + 8, 2) == 0);
      size_t const given = bb->getWorkspaceSize(prof, 8, prof + 8, 2);
      CHECK(given == (split ? 320U : 0U));
      PluginFieldCollection const* fc = cap<IPluginV3OneRuntime>(bp, PluginCapabilityType::kRUNTIME)->getFieldsToSerialize();
      PluginField const* wf = fieldOf(fc, "workspace_bytes");
      CHECK(wf != nullptr && wf->type == PluginFieldType::kINT64 && wf->length == 1);
      if (wf != nullptr) CHECK(*static_cast<int64_t const*>(wf->data) == static_cast<int64_t>(given));
      if (split) setenv("MQ_SCAN_CUDA_SPLIT", "0", 1);
      else unsetenv("MQ_SCAN_CUDA_SPLIT");
      IPluginV3* rp = creator.createPlugin("ssd0", fc, TensorRTPhase::kRUNTIME);
      CHECK(rp != nullptr);
      IPluginV3* ra = cap<IPluginV3OneRuntime>(rp, PluginCapabilityType::kRUNTIME)->attachToContext(nullptr);
      gWsPtr = nullptr;
      gWsBytes = 12345;
      Buffers tb = buffers(2, 37, rng);
      diff = enqueueVsDirect(cap<IPluginV3OneRuntime>(ra, PluginCapabilityType::kRUNTIME), attrs, tb, ws.data(), &ref);
      std::printf("workspace: built with MQ_SCAN_CUDA_SPLIT=%s, getWorkspaceSize %zu, enqueue passed %zu bytes\n",
                  buildEnv, given, gWsBytes);
      CHECK(diff == 0.0);
      CHECK(gWsBytes == given);
      CHECK(gWsPtr == (given > 0 ? ws.data() : nullptr));
      delete ra;
      delete rp;
      delete bp;
    }
    unsetenv("MQ_SCAN_CUDA_SPLIT");
  }

  delete attached;
  delete restored;
  delete plugin;
  CHECK(gMallocs == 0);
  if (gFailures) {
    std::fprintf(stderr, "%d check(s) failed\n", gFailures);
    return 1;
  }
  std::printf("OK: SSDScan plugin host test passed\n");
  return 0;
}
