// Host-side check of the SSDDecodeNMS TensorRT plugin without TensorRT's libraries or a GPU.
//
// The plugin only implements TensorRT's abstract interfaces, so it can be driven the way the builder, the ONNX
// parser and the runtime drive it: fields in the parser's encoding, shapes through a fake IExprBuilder, and
// enqueue into a recording stand-in for the CUDA kernel (defined below, instead of linking the real one).
// Build and run (tests/ops/test_tensorrt_binding.py does this when TRT_INCLUDE_DIR is set):
//   g++ -std=c++17 -Wall -Wextra -Werror -isystem $TRT_INCLUDE_DIR -isystem /usr/local/cuda/include
//       -Iplugins/nms/include plugins/nms/bindings/tensorrt/ssdopt_nms_trt.cpp
//       plugins/nms/bindings/tensorrt/plugin_host_check.cpp plugins/nms/src/common/validate.cpp -o check
//   ./check
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ssdopt_nms_trt.h"

using namespace nvinfer1;

// ---- stand-ins for the CUDA kernel: record what the plugin passes -------------------------------------------
namespace {
struct KernelCall {
  int count = 0;
  ssdopt::nms::DType dtype = ssdopt::nms::DType::kFloat32;
  ssdopt::nms::Shape shape;
  ssdopt::nms::Params params;
  void const* inputs[3] = {nullptr, nullptr, nullptr};
  void* outputs[4] = {nullptr, nullptr, nullptr, nullptr};
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  void* stream = nullptr;
} gLastCall;

size_t fakeWorkspace(ssdopt::nms::DType dtype, ssdopt::nms::Shape const& s, ssdopt::nms::Params const& p) {
  return static_cast<size_t>(s.batch) * s.anchors * s.classes * (dtype == ssdopt::nms::DType::kFloat16 ? 2 : 4) +
         static_cast<size_t>(p.pre_nms_top_k);
}
}  // namespace

namespace ssdopt {
namespace nms {
size_t decode_nms_cuda_workspace_size(DType dtype, Shape const& shape, Params const& params) {
  return fakeWorkspace(dtype, shape, params);
}
int decode_nms_cuda(DType dtype, void const* box_deltas, void const* class_logits, float const* anchors,
                    Shape const& shape, Params const& params, void* workspace, size_t workspace_bytes,
                    int32_t* num_detections, float* boxes, float* scores, int32_t* labels, void* stream) {
  gLastCall.count++;
  gLastCall.dtype = dtype;
  gLastCall.shape = shape;
  gLastCall.params = params;
  gLastCall.inputs[0] = box_deltas;
  gLastCall.inputs[1] = class_logits;
  gLastCall.inputs[2] = anchors;
  gLastCall.outputs[0] = num_detections;
  gLastCall.outputs[1] = boxes;
  gLastCall.outputs[2] = scores;
  gLastCall.outputs[3] = labels;
  gLastCall.workspace = workspace;
  gLastCall.workspace_bytes = workspace_bytes;
  gLastCall.stream = stream;
  return 0;
}
}  // namespace nms
}  // namespace ssdopt

// ---- a fake dimension-expression builder: constants and one symbolic batch -----------------------------------
namespace {
class FakeDimImpl : public apiv::VDimensionExpr {
 public:
  FakeDimImpl(bool constant, int64_t value) : mConstant(constant), mValue(value) {}
  bool isConstant() const override { return mConstant; }
  int64_t getConstantValue() const override { return mConstant ? mValue : -1; }
  bool isSizeTensor() const override { return false; }

 private:
  bool mConstant;
  int64_t mValue;
};

class FakeDim : public IDimensionExpr {
 public:
  FakeDim(bool constant, int64_t value) : mOwned(constant, value) { mImpl = &mOwned; }
  ~FakeDim() noexcept override = default;

 private:
  FakeDimImpl mOwned;
};

class FakeExprBuilderImpl : public apiv::VExprBuilder {
 public:
  IDimensionExpr const* constant(int64_t value) override {
    mDims.push_back(std::make_unique<FakeDim>(true, value));
    return mDims.back().get();
  }
  IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override {
    return nullptr;  // the plugin needs no arithmetic on dimensions
  }
  IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
    return nullptr;
  }
  IDimensionExpr const* symbol() {
    mDims.push_back(std::make_unique<FakeDim>(false, -1));
    return mDims.back().get();
  }

 private:
  std::vector<std::unique_ptr<FakeDim>> mDims;
};

class FakeExprBuilder : public IExprBuilder {
 public:
  FakeExprBuilder() { mImpl = &mOwned; }
  ~FakeExprBuilder() noexcept override = default;
  IDimensionExpr const* symbol() { return mOwned.symbol(); }

 private:
  FakeExprBuilderImpl mOwned;
};

// ---- tiny test harness -------------------------------------------------------------------------------------
int gFailures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++gFailures;                                                           \
    }                                                                        \
  } while (0)

Dims dims(std::vector<int64_t> const& values) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(values.size());
  for (size_t i = 0; i < values.size(); ++i) d.d[i] = values[i];
  return d;
}

DynamicPluginTensorDesc dynamicDesc(std::vector<int64_t> const& desc, std::vector<int64_t> const& max, DataType type) {
  DynamicPluginTensorDesc d{};
  d.desc.dims = dims(desc);
  d.desc.type = type;
  d.desc.format = TensorFormat::kLINEAR;
  d.min = dims(max);
  d.opt = dims(max);
  d.max = dims(max);
  return d;
}

bool sameParams(ssdopt::nms::Params const& a, ssdopt::nms::Params const& b) {
  bool same = a.score_threshold == b.score_threshold && a.iou_threshold == b.iou_threshold &&
              a.pre_nms_top_k == b.pre_nms_top_k && a.max_detections == b.max_detections &&
              a.softmax == b.softmax && a.background_class == b.background_class &&
              a.class_agnostic == b.class_agnostic && a.image_height == b.image_height &&
              a.image_width == b.image_width;
  for (int i = 0; i < 4; ++i) same = same && a.box_weights[i] == b.box_weights[i];
  return same;
}

// Fields exactly as TensorRT's ONNX parser builds them from node attributes (onnxOpImporters.cpp loadFields):
// FLOAT -> kFLOAT32 x1, INT -> kINT32 x1, STRING -> kCHAR with its '\0', FLOATS -> kFLOAT32 xN, INTS -> kINT32 xN.
struct ParserFields {
  float score_threshold = 0.25f, iou_threshold = 0.6f, box_weights[4] = {1.f, 2.f, 3.f, 4.f};
  int32_t pre_nms_top_k = 100, max_detections = 50, background_class = -1, class_agnostic = 1;
  int32_t image_size[2] = {240, 400};
  char activation[8] = "sigmoid";
  char plugin_namespace[7] = "ssdopt";
  std::vector<PluginField> fields;
  PluginFieldCollection collection{};
  ParserFields() {
    fields = {PluginField("score_threshold", &score_threshold, PluginFieldType::kFLOAT32, 1),
              PluginField("iou_threshold", &iou_threshold, PluginFieldType::kFLOAT32, 1),
              PluginField("pre_nms_top_k", &pre_nms_top_k, PluginFieldType::kINT32, 1),
              PluginField("max_detections", &max_detections, PluginFieldType::kINT32, 1),
              PluginField("box_weights", box_weights, PluginFieldType::kFLOAT32, 4),
              PluginField("score_activation", activation, PluginFieldType::kCHAR, 8),
              PluginField("background_class", &background_class, PluginFieldType::kINT32, 1),
              PluginField("class_agnostic", &class_agnostic, PluginFieldType::kINT32, 1),
              PluginField("image_size", image_size, PluginFieldType::kINT32, 2),
              PluginField("plugin_namespace", plugin_namespace, PluginFieldType::kCHAR, 7)};
    collection.nbFields = static_cast<int32_t>(fields.size());
    collection.fields = fields.data();
  }
};

IPluginCreatorV3One* theCreator() {
  int32_t count = 0;
  IPluginCreatorInterface* const* creators = getCreators(count);
  CHECK(count == 1 && creators != nullptr);
  CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
  return static_cast<IPluginCreatorV3One*>(creators[0]);
}

ssdopt::trt::SSDDecodeNMSPlugin* asPlugin(IPluginV3* plugin) {
  return dynamic_cast<ssdopt::trt::SSDDecodeNMSPlugin*>(plugin);
}

void checkCreatorIdentity() {
  IPluginCreatorV3One* creator = theCreator();
  CHECK(std::string(creator->getPluginName()) == "SSDDecodeNMS");
  CHECK(std::string(creator->getPluginVersion()) == "1");
  CHECK(std::string(creator->getPluginNamespace()) == "ssdopt");
  PluginFieldCollection const* names = creator->getFieldNames();
  CHECK(names != nullptr && names->nbFields == 9);
}

void checkFieldsFromParser() {
  ParserFields parser;
  std::unique_ptr<IPluginV3> plugin(theCreator()->createPlugin("nms", &parser.collection, TensorRTPhase::kBUILD));
  CHECK(plugin != nullptr);
  if (!plugin) return;
  ssdopt::nms::Params const p = asPlugin(plugin.get())->params();  // a copy: plugin is reset below
  CHECK(p.score_threshold == 0.25f && p.iou_threshold == 0.6f);
  CHECK(p.pre_nms_top_k == 100 && p.max_detections == 50);
  CHECK(p.box_weights[0] == 1.f && p.box_weights[1] == 2.f && p.box_weights[2] == 3.f && p.box_weights[3] == 4.f);
  CHECK(!p.softmax && p.background_class == -1 && p.class_agnostic);
  CHECK(p.image_height == 240 && p.image_width == 400);

  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  CHECK(std::string(core->getPluginName()) == "SSDDecodeNMS" && std::string(core->getPluginNamespace()) == "ssdopt");
  CHECK(std::strcmp(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD)->getInterfaceInfo().kind,
                    "PLUGIN_V3ONE_BUILD") == 0);
  CHECK(std::strcmp(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME)->getInterfaceInfo().kind,
                    "PLUGIN_V3ONE_RUNTIME") == 0);

  // Serialization round trip: the runtime phase recreates the plugin from getFieldsToSerialize().
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  std::unique_ptr<IPluginV3> restored(
      theCreator()->createPlugin("nms", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
  CHECK(restored != nullptr && sameParams(asPlugin(restored.get())->params(), p));
  std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
  CHECK(attached != nullptr && sameParams(asPlugin(attached.get())->params(), p));
  std::unique_ptr<IPluginV3> cloned(plugin->clone());
  plugin.reset();  // the clone must not point into the original's storage
  auto* clonedRuntime =
      static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  std::unique_ptr<IPluginV3> fromClone(
      theCreator()->createPlugin("nms", clonedRuntime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
  CHECK(fromClone != nullptr && sameParams(asPlugin(fromClone.get())->params(), p));
}

void checkDefaultsAndBadFields() {
  PluginFieldCollection empty{};
  std::unique_ptr<IPluginV3> plugin(theCreator()->createPlugin("nms", &empty, TensorRTPhase::kBUILD));
  CHECK(plugin != nullptr && sameParams(asPlugin(plugin.get())->params(), ssdopt::nms::Params{}));

  int64_t k64 = 7;  // other integer widths are accepted
  double iou64 = 0.5;
  std::vector<PluginField> wide = {PluginField("max_detections", &k64, PluginFieldType::kINT64, 1),
                                   PluginField("iou_threshold", &iou64, PluginFieldType::kFLOAT64, 1)};
  PluginFieldCollection wideCollection{2, wide.data()};
  std::unique_ptr<IPluginV3> widePlugin(theCreator()->createPlugin("nms", &wideCollection, TensorRTPhase::kBUILD));
  CHECK(widePlugin != nullptr && asPlugin(widePlugin.get())->params().max_detections == 7 &&
        asPlugin(widePlugin.get())->params().iou_threshold == 0.5f);

  char relu[] = "relu";
  float three[3] = {1.f, 1.f, 1.f};
  float fractional = 2.5f;
  std::vector<std::vector<PluginField>> bad = {
      {PluginField("score_activation", relu, PluginFieldType::kCHAR, 5)},
      {PluginField("box_weights", three, PluginFieldType::kFLOAT32, 3)},
      {PluginField("max_detections", &fractional, PluginFieldType::kFLOAT32, 1)},
  };
  for (auto& fields : bad) {
    PluginFieldCollection collection{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> rejected(theCreator()->createPlugin("nms", &collection, TensorRTPhase::kBUILD));
    CHECK(rejected == nullptr);
  }
}

void checkBuildInterface() {
  ParserFields parser;
  std::unique_ptr<IPluginV3> plugin(theCreator()->createPlugin("nms", &parser.collection, TensorRTPhase::kBUILD));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  CHECK(build->getNbOutputs() == 4);

  DataType in[3] = {DataType::kHALF, DataType::kHALF, DataType::kFLOAT};
  DataType out[4];
  CHECK(build->getOutputDataTypes(out, 4, in, 3) == 0);
  CHECK(out[0] == DataType::kINT32 && out[1] == DataType::kFLOAT && out[2] == DataType::kFLOAT &&
        out[3] == DataType::kINT32);
  DataType int8In[3] = {DataType::kINT8, DataType::kINT8, DataType::kFLOAT};
  CHECK(build->getOutputDataTypes(out, 4, int8In, 3) != 0);

  // Shapes: [B] / [B, K, 4] / [B, K] / [B, K] with symbolic B and K = max_detections = 50.
  FakeExprBuilder exprs;
  DimsExprs inputs[3];
  inputs[0].nbDims = 3;
  inputs[0].d[0] = exprs.symbol();
  inputs[0].d[1] = exprs.constant(3234);
  inputs[0].d[2] = exprs.constant(4);
  inputs[1] = inputs[0];
  inputs[1].d[2] = exprs.constant(91);
  inputs[2].nbDims = 2;
  inputs[2].d[0] = exprs.constant(3234);
  inputs[2].d[1] = exprs.constant(4);
  DimsExprs outputs[4];
  CHECK(build->getOutputShapes(inputs, 3, nullptr, 0, outputs, 4, exprs) == 0);
  CHECK(outputs[0].nbDims == 1 && outputs[0].d[0] == inputs[0].d[0]);
  CHECK(outputs[1].nbDims == 3 && outputs[1].d[0] == inputs[0].d[0] && outputs[1].d[1]->getConstantValue() == 50 &&
        outputs[1].d[2]->getConstantValue() == 4);
  CHECK(outputs[2].nbDims == 2 && outputs[2].d[1]->getConstantValue() == 50);
  CHECK(outputs[3].nbDims == 2 && outputs[3].d[0] == inputs[0].d[0] && outputs[3].d[1]->getConstantValue() == 50);

  // Formats: linear only; f32 or f16 scores/deltas (same type), f32 anchors, i32/f32/f32/i32 outputs.
  std::vector<DynamicPluginTensorDesc> io = {
      dynamicDesc({-1, 3234, 4}, {8, 3234, 4}, DataType::kHALF), dynamicDesc({-1, 3234, 91}, {8, 3234, 91}, DataType::kHALF),
      dynamicDesc({3234, 4}, {3234, 4}, DataType::kFLOAT),       dynamicDesc({-1}, {8}, DataType::kINT32),
      dynamicDesc({-1, 50, 4}, {8, 50, 4}, DataType::kFLOAT),    dynamicDesc({-1, 50}, {8, 50}, DataType::kFLOAT),
      dynamicDesc({-1, 50}, {8, 50}, DataType::kINT32)};
  for (int pos = 0; pos < 7; ++pos) CHECK(build->supportsFormatCombination(pos, io.data(), 3, 4));
  auto rejects = [&](int pos, DataType type, TensorFormat format) {
    std::vector<DynamicPluginTensorDesc> changed = io;
    changed[pos].desc.type = type;
    changed[pos].desc.format = format;
    return !build->supportsFormatCombination(pos, changed.data(), 3, 4);
  };
  CHECK(rejects(0, DataType::kINT8, TensorFormat::kLINEAR));
  CHECK(rejects(0, DataType::kFLOAT, TensorFormat::kCHW32));
  CHECK(rejects(1, DataType::kFLOAT, TensorFormat::kLINEAR));  // must match box_deltas (f16 here)
  CHECK(rejects(2, DataType::kHALF, TensorFormat::kLINEAR));
  CHECK(rejects(3, DataType::kFLOAT, TensorFormat::kLINEAR));
  CHECK(rejects(4, DataType::kHALF, TensorFormat::kLINEAR));
  CHECK(rejects(6, DataType::kFLOAT, TensorFormat::kLINEAR));
  CHECK(!build->supportsFormatCombination(7, io.data(), 3, 4));

  CHECK(build->configurePlugin(io.data(), 3, io.data() + 3, 4) == 0);
  ssdopt::nms::Shape const maxShape{8, 3234, 91};
  CHECK(build->getWorkspaceSize(io.data(), 3, io.data() + 3, 4) ==
        fakeWorkspace(ssdopt::nms::DType::kFloat16, maxShape, asPlugin(plugin.get())->params()));
  std::vector<DynamicPluginTensorDesc> mismatched = io;
  mismatched[2] = dynamicDesc({3000, 4}, {3000, 4}, DataType::kFLOAT);  // anchors disagree with A
  CHECK(build->configurePlugin(mismatched.data(), 3, mismatched.data() + 3, 4) != 0);
  std::vector<DynamicPluginTensorDesc> badBackground = io;  // background_class must be < C
  badBackground[1] = dynamicDesc({-1, 3234, 1}, {8, 3234, 1}, DataType::kHALF);
  parser.background_class = 5;
  std::unique_ptr<IPluginV3> bg(theCreator()->createPlugin("nms", &parser.collection, TensorRTPhase::kBUILD));
  auto* bgBuild = static_cast<IPluginV3OneBuild*>(bg->getCapabilityInterface(PluginCapabilityType::kBUILD));
  CHECK(bgBuild->configurePlugin(badBackground.data(), 3, badBackground.data() + 3, 4) != 0);
  CHECK(build->getMetadataString() != nullptr && std::strstr(build->getMetadataString(), "max_detections=50"));
}

void checkEnqueue() {
  ParserFields parser;
  std::unique_ptr<IPluginV3> plugin(theCreator()->createPlugin("nms", &parser.collection, TensorRTPhase::kRUNTIME));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginTensorDesc in[3] = {};
  in[0].dims = dims({3, 100, 4});
  in[0].type = DataType::kFLOAT;
  in[1].dims = dims({3, 100, 9});
  in[1].type = DataType::kFLOAT;
  in[2].dims = dims({100, 4});
  in[2].type = DataType::kFLOAT;
  PluginTensorDesc out[4] = {};
  CHECK(runtime->onShapeChange(in, 3, out, 4) == 0);
  int buffers[7];
  void const* inputs[3] = {&buffers[0], &buffers[1], &buffers[2]};
  void* outputs[4] = {&buffers[3], &buffers[4], &buffers[5], &buffers[6]};
  char workspace[1];
  auto stream = reinterpret_cast<cudaStream_t>(&buffers[0]);
  gLastCall = KernelCall{};
  CHECK(runtime->enqueue(in, out, inputs, outputs, workspace, stream) == 0);
  CHECK(gLastCall.count == 1 && gLastCall.dtype == ssdopt::nms::DType::kFloat32);
  CHECK(gLastCall.shape.batch == 3 && gLastCall.shape.anchors == 100 && gLastCall.shape.classes == 9);
  CHECK(sameParams(gLastCall.params, asPlugin(plugin.get())->params()));
  for (int i = 0; i < 3; ++i) CHECK(gLastCall.inputs[i] == inputs[i]);
  for (int i = 0; i < 4; ++i) CHECK(gLastCall.outputs[i] == outputs[i]);
  CHECK(gLastCall.workspace == workspace && gLastCall.stream == static_cast<void*>(stream));
  CHECK(gLastCall.workspace_bytes == fakeWorkspace(ssdopt::nms::DType::kFloat32, gLastCall.shape, gLastCall.params));

  in[0].type = in[1].type = DataType::kHALF;
  CHECK(runtime->enqueue(in, out, inputs, outputs, workspace, stream) == 0);
  CHECK(gLastCall.count == 2 && gLastCall.dtype == ssdopt::nms::DType::kFloat16);

  in[1].dims = dims({2, 100, 9});  // batch disagrees
  CHECK(runtime->onShapeChange(in, 3, out, 4) != 0);
}

}  // namespace

int main() {
  checkCreatorIdentity();
  checkFieldsFromParser();
  checkDefaultsAndBadFields();
  checkBuildInterface();
  checkEnqueue();
  std::printf("TensorRT %d.%d.%d headers: %s (%d failures)\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR,
              NV_TENSORRT_PATCH, gFailures == 0 ? "all checks passed" : "FAILED", gFailures);
  return gFailures == 0 ? 0 : 1;
}
