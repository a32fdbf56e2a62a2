// SSDDecodeNMS as a TensorRT IPluginV3 (OneCore / OneBuild / OneRuntime) with its IPluginCreatorV3One.
//
// Plugin name "SSDDecodeNMS", version "1", namespace "ssdopt". The ONNX parser maps a node whose op_type is
// SSDDecodeNMS (attributes plugin_version = "1", plugin_namespace = "ssdopt") to this plugin and passes the
// node's attributes as plugin fields:
//   score_threshold f32 · iou_threshold f32 · pre_nms_top_k i32 · max_detections i32 · box_weights f32[4] ·
//   score_activation char ("softmax" | "sigmoid") · background_class i32 · class_agnostic i32 · image_size i32[2]
// Missing fields take the DESIGN.md defaults; integer fields accept INT8/16/32/64, float fields FLOAT32/64.
//
// Inputs : box_deltas [B, A, 4] f32|f16 · class_logits [B, A, C] same dtype · anchors [A, 4] f32
// Outputs: num_detections [B] i32 · boxes [B, K, 4] f32 · scores [B, K] f32 · labels [B, K] i32 (K = max_detections)
// B may be dynamic; enqueue calls ssdopt::nms::decode_nms_cuda on the TensorRT stream (no host sync).
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

#ifndef SSDOPT_WITH_CUDA
#define SSDOPT_WITH_CUDA 1
#endif
#include "ssdopt_nms.h"

namespace ssdopt {
namespace trt {

constexpr char const* kPluginName = "SSDDecodeNMS";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "ssdopt";

// Parses plugin fields into kernel parameters, starting from the DESIGN.md defaults.
// Returns an empty string on success, else a message naming the bad field and what was expected.
std::string params_from_fields(nvinfer1::PluginFieldCollection const* fields, nms::Params& params);

class SSDDecodeNMSPlugin final : public nvinfer1::IPluginV3,
                                 public nvinfer1::IPluginV3OneCore,
                                 public nvinfer1::IPluginV3OneBuild,
                                 public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit SSDDecodeNMSPlugin(nms::Params const& params);
  SSDDecodeNMSPlugin(SSDDecodeNMSPlugin const& other);
  SSDDecodeNMSPlugin& operator=(SSDDecodeNMSPlugin const&) = delete;
  ~SSDDecodeNMSPlugin() override = default;

  nms::Params const& params() const noexcept { return mParams; }

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                          nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
  char const* getMetadataString() noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  void buildSerializedFields();

  nms::Params mParams;
  // Storage the serialized PluginFields point into (rebuilt by buildSerializedFields()).
  int32_t mPreNmsTopK = 0;
  int32_t mMaxDetections = 0;
  int32_t mBackgroundClass = 0;
  int32_t mClassAgnostic = 0;
  int32_t mImageSize[2] = {0, 0};
  std::string mScoreActivation;
  std::string mMetadata;
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

class SSDDecodeNMSPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  SSDDecodeNMSPluginCreator();

  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldNameCollection{};
};

}  // namespace trt
}  // namespace ssdopt

// Entry points of the plugin shared library (libssdopt_nms_trt.so).
extern "C" {
// Looked up by IPluginRegistry::loadLibrary (Python: trt.get_plugin_registry().load_library(path)) and by
// trtexec --dynamicPlugins / --setPluginsToSerialize.
__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
// For C++ hosts that prefer explicit registration (initLibNvInferPlugins style) without dlopen:
// registers the creator in `registry` (e.g. getPluginRegistry()) under namespace "ssdopt". Returns false
// when a creator with the same name/version/namespace is already registered.
__attribute__((visibility("default"))) bool ssdoptRegisterTensorRTPlugins(nvinfer1::IPluginRegistry* registry);
}
