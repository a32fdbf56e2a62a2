// SSDDecodeNMS TensorRT plugin: fields <-> kernel parameters, shapes/types for the builder, enqueue on the stream.
// Interface and field list: ssdopt_nms_trt.h.
#include "ssdopt_nms_trt.h"

#include <atomic>
#include <cstring>
#include <exception>
#include <climits>
#include <sstream>

namespace ssdopt {
namespace trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;
using nvinfer1::TensorFormat;

constexpr int32_t kNbInputs = 3;   // box_deltas, class_logits, anchors
constexpr int32_t kNbOutputs = 4;  // num_detections, boxes, scores, labels

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

// Logs through the ILogger TensorRT hands over in setLoggerFinder(); silent when none was given.
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept {
  try {
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr) {
      std::string const line = std::string("[ssdopt::SSDDecodeNMS] ") + message;
      logger->log(severity, line.c_str());
    }
  } catch (...) {
  }
}

void logError(std::string const& message) noexcept { logMessage(nvinfer1::ILogger::Severity::kERROR, message); }

// Reads `count` numbers from a field of any integer or float type; false when the type or length differs.
bool readNumbers(PluginField const& field, double* values, int32_t count) {
  if (field.data == nullptr || field.length != count) return false;
  for (int32_t i = 0; i < count; ++i) {
    switch (field.type) {
      case PluginFieldType::kFLOAT32: values[i] = static_cast<float const*>(field.data)[i]; break;
      case PluginFieldType::kFLOAT64: values[i] = static_cast<double const*>(field.data)[i]; break;
      case PluginFieldType::kINT8: values[i] = static_cast<int8_t const*>(field.data)[i]; break;
      case PluginFieldType::kINT16: values[i] = static_cast<int16_t const*>(field.data)[i]; break;
      case PluginFieldType::kINT32: values[i] = static_cast<int32_t const*>(field.data)[i]; break;
      case PluginFieldType::kINT64: values[i] = static_cast<double>(static_cast<int64_t const*>(field.data)[i]); break;
      default: return false;
    }
  }
  return true;
}

bool isIntegral(double value) { return value == static_cast<double>(static_cast<int64_t>(value)); }

bool readInt(PluginField const& field, int32_t& out) {
  double value = 0.0;
  if (!readNumbers(field, &value, 1) || !isIntegral(value) || value < INT32_MIN || value > INT32_MAX) return false;
  out = static_cast<int32_t>(value);
  return true;
}

std::string readString(PluginField const& field) {
  if (field.data == nullptr || field.length <= 0) return std::string();
  char const* chars = static_cast<char const*>(field.data);
  size_t length = 0;
  while (length < static_cast<size_t>(field.length) && chars[length] != '\0') ++length;
  return std::string(chars, length);
}

std::string fieldError(char const* name, char const* expected) {
  return std::string("plugin field '") + name + "': expected " + expected;
}

bool isLinear(nvinfer1::PluginTensorDesc const& desc, DataType type) {
  return desc.format == TensorFormat::kLINEAR && desc.type == type;
}

nms::DType kernelDType(DataType type) { return type == DataType::kHALF ? nms::DType::kFloat16 : nms::DType::kFloat32; }

// Shape of the problem from input dims; -1 stays -1 (unknown at build time).
nms::Shape shapeFromDims(nvinfer1::Dims const& boxDeltas, nvinfer1::Dims const& classLogits) {
  nms::Shape shape;
  shape.batch = static_cast<int32_t>(boxDeltas.d[0]);
  shape.anchors = static_cast<int32_t>(boxDeltas.d[1]);
  shape.classes = static_cast<int32_t>(classLogits.d[2]);
  return shape;
}

// Checks ranks and the dims that must agree; returns an empty string when they do (unknown dims pass).
std::string checkInputDims(nvinfer1::Dims const& boxDeltas, nvinfer1::Dims const& classLogits,
                           nvinfer1::Dims const& anchors) {
  std::ostringstream message;
  auto agree = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
  if (boxDeltas.nbDims != 3 || classLogits.nbDims != 3 || anchors.nbDims != 2) {
    message << "inputs must be box_deltas [B, A, 4], class_logits [B, A, C], anchors [A, 4]; got ranks "
            << boxDeltas.nbDims << ", " << classLogits.nbDims << ", " << anchors.nbDims;
  } else if (!agree(boxDeltas.d[2], 4) || !agree(anchors.d[1], 4)) {
    message << "box_deltas and anchors must have 4 values per box";
  } else if (!agree(boxDeltas.d[0], classLogits.d[0])) {
    message << "box_deltas and class_logits must have the same batch size";
  } else if (!agree(boxDeltas.d[1], classLogits.d[1]) || !agree(boxDeltas.d[1], anchors.d[0])) {
    message << "box_deltas, class_logits and anchors must have the same number of anchors A";
  }
  return message.str();
}

}  // namespace

std::string params_from_fields(nvinfer1::PluginFieldCollection const* fields, nms::Params& params) {
  params = nms::Params{};
  if (fields == nullptr) return std::string();
  for (int32_t i = 0; i < fields->nbFields; ++i) {
    PluginField const& field = fields->fields[i];
    if (field.name == nullptr) continue;
    std::string const name(field.name);
    double values[4] = {0.0, 0.0, 0.0, 0.0};
    if (name == "score_threshold") {
      if (!readNumbers(field, values, 1)) return fieldError(field.name, "one float");
      params.score_threshold = static_cast<float>(values[0]);
    } else if (name == "iou_threshold") {
      if (!readNumbers(field, values, 1)) return fieldError(field.name, "one float");
      params.iou_threshold = static_cast<float>(values[0]);
    } else if (name == "pre_nms_top_k") {
      if (!readInt(field, params.pre_nms_top_k)) return fieldError(field.name, "one integer");
    } else if (name == "max_detections") {
      if (!readInt(field, params.max_detections)) return fieldError(field.name, "one integer");
    } else if (name == "background_class") {
      if (!readInt(field, params.background_class)) return fieldError(field.name, "one integer");
    } else if (name == "class_agnostic") {
      int32_t flag = 0;
      if (!readInt(field, flag) || (flag != 0 && flag != 1)) return fieldError(field.name, "0 or 1");
      params.class_agnostic = flag == 1;
    } else if (name == "box_weights") {
      if (!readNumbers(field, values, 4)) return fieldError(field.name, "4 floats (wx, wy, ww, wh)");
      for (int k = 0; k < 4; ++k) params.box_weights[k] = static_cast<float>(values[k]);
    } else if (name == "image_size") {
      if (!readNumbers(field, values, 2) || !isIntegral(values[0]) || !isIntegral(values[1]))
        return fieldError(field.name, "2 integers (H, W)");
      params.image_height = static_cast<int32_t>(values[0]);
      params.image_width = static_cast<int32_t>(values[1]);
    } else if (name == "score_activation") {
      if (field.type != PluginFieldType::kCHAR) return fieldError(field.name, "a string");
      std::string const activation = readString(field);
      if (activation != "softmax" && activation != "sigmoid")
        return fieldError(field.name, "\"softmax\" or \"sigmoid\"");
      params.softmax = activation == "softmax";
    }
    // Other fields (plugin_version, plugin_namespace, future attributes) are ignored.
  }
  return std::string();
}

// ---------------------------------------------------------------------------------------------------------------
// Plugin

SSDDecodeNMSPlugin::SSDDecodeNMSPlugin(nms::Params const& params) : mParams(params) { buildSerializedFields(); }

SSDDecodeNMSPlugin::SSDDecodeNMSPlugin(SSDDecodeNMSPlugin const& other)
    : nvinfer1::IPluginV3(other),
      nvinfer1::IPluginV3OneCore(other),
      nvinfer1::IPluginV3OneBuild(other),
      nvinfer1::IPluginV3OneRuntime(other),
      mParams(other.mParams) {
  buildSerializedFields();
}

void SSDDecodeNMSPlugin::buildSerializedFields() {
  mPreNmsTopK = mParams.pre_nms_top_k;
  mMaxDetections = mParams.max_detections;
  mBackgroundClass = mParams.background_class;
  mClassAgnostic = mParams.class_agnostic ? 1 : 0;
  mImageSize[0] = mParams.image_height;
  mImageSize[1] = mParams.image_width;
  mScoreActivation = mParams.softmax ? "softmax" : "sigmoid";
  mFields.clear();
  mFields.emplace_back("score_threshold", &mParams.score_threshold, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("iou_threshold", &mParams.iou_threshold, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("pre_nms_top_k", &mPreNmsTopK, PluginFieldType::kINT32, 1);
  mFields.emplace_back("max_detections", &mMaxDetections, PluginFieldType::kINT32, 1);
  mFields.emplace_back("box_weights", mParams.box_weights, PluginFieldType::kFLOAT32, 4);
  mFields.emplace_back("score_activation", mScoreActivation.c_str(), PluginFieldType::kCHAR,
                       static_cast<int32_t>(mScoreActivation.size() + 1));
  mFields.emplace_back("background_class", &mBackgroundClass, PluginFieldType::kINT32, 1);
  mFields.emplace_back("class_agnostic", &mClassAgnostic, PluginFieldType::kINT32, 1);
  mFields.emplace_back("image_size", mImageSize, PluginFieldType::kINT32, 2);
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();

  std::ostringstream metadata;
  metadata << "score_threshold=" << mParams.score_threshold << " iou_threshold=" << mParams.iou_threshold
           << " pre_nms_top_k=" << mParams.pre_nms_top_k << " max_detections=" << mParams.max_detections
           << " box_weights=[" << mParams.box_weights[0] << "," << mParams.box_weights[1] << ","
           << mParams.box_weights[2] << "," << mParams.box_weights[3] << "] score_activation=" << mScoreActivation
           << " background_class=" << mParams.background_class << " class_agnostic=" << mClassAgnostic
           << " image_size=[" << mImageSize[0] << "," << mImageSize[1] << "]";
  mMetadata = metadata.str();
}

nvinfer1::IPluginCapability* SSDDecodeNMSPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* SSDDecodeNMSPlugin::clone() noexcept {
  try {
    return new SSDDecodeNMSPlugin(*this);
  } catch (std::exception const& error) {
    logError(std::string("clone failed: ") + error.what());
  }
  return nullptr;
}

char const* SSDDecodeNMSPlugin::getPluginName() const noexcept { return kPluginName; }
char const* SSDDecodeNMSPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* SSDDecodeNMSPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

int32_t SSDDecodeNMSPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                            nvinfer1::DynamicPluginTensorDesc const* /*out*/,
                                            int32_t nbOutputs) noexcept {
  if (in == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
    logError("expected 3 inputs (box_deltas, class_logits, anchors) and 4 outputs");
    return 1;
  }
  std::string const dimsError = checkInputDims(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims);
  if (!dimsError.empty()) {
    logError(dimsError);
    return 1;
  }
  // The largest problem of the profile must be valid for the kernel (unknown dims are bounded by max).
  nms::Shape const shape = shapeFromDims(in[0].max, in[1].max);
  if (char const* problem = nms::validate(shape, mParams)) {
    logError(problem);
    return 1;
  }
  return 0;
}

int32_t SSDDecodeNMSPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                               DataType const* inputTypes, int32_t nbInputs) const noexcept {
  if (outputTypes == nullptr || nbOutputs != kNbOutputs || nbInputs != kNbInputs) return 1;
  if (inputTypes != nullptr && inputTypes[0] != DataType::kFLOAT && inputTypes[0] != DataType::kHALF) {
    logError("box_deltas and class_logits must be float32 or float16");
    return 1;
  }
  outputTypes[0] = DataType::kINT32;  // num_detections
  outputTypes[1] = DataType::kFLOAT;  // boxes
  outputTypes[2] = DataType::kFLOAT;  // scores
  outputTypes[3] = DataType::kINT32;  // labels
  return 0;
}

int32_t SSDDecodeNMSPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                            nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                            nvinfer1::IExprBuilder& exprBuilder) noexcept {
  if (inputs == nullptr || outputs == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs ||
      inputs[0].nbDims != 3) {
    logError("expected box_deltas [B, A, 4], class_logits [B, A, C], anchors [A, 4] and 4 outputs");
    return 1;
  }
  nvinfer1::IDimensionExpr const* batch = inputs[0].d[0];
  nvinfer1::IDimensionExpr const* k = exprBuilder.constant(mParams.max_detections);
  outputs[0].nbDims = 1;  // num_detections [B]
  outputs[0].d[0] = batch;
  outputs[1].nbDims = 3;  // boxes [B, K, 4]
  outputs[1].d[0] = batch;
  outputs[1].d[1] = k;
  outputs[1].d[2] = exprBuilder.constant(4);
  for (int32_t i = 2; i < kNbOutputs; ++i) {  // scores, labels [B, K]
    outputs[i].nbDims = 2;
    outputs[i].d[0] = batch;
    outputs[i].d[1] = k;
  }
  return 0;
}

bool SSDDecodeNMSPlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                                   int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 ||
      pos >= kNbInputs + kNbOutputs) {
    return false;
  }
  nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
  switch (pos) {
    case 0: return isLinear(desc, DataType::kFLOAT) || isLinear(desc, DataType::kHALF);  // box_deltas
    case 1: return isLinear(desc, inOut[0].desc.type);                                  // class_logits
    case 2: return isLinear(desc, DataType::kFLOAT);                                    // anchors
    case 3: return isLinear(desc, DataType::kINT32);                                    // num_detections
    case 4:                                                                             // boxes
    case 5: return isLinear(desc, DataType::kFLOAT);                                    // scores
    case 6: return isLinear(desc, DataType::kINT32);                                    // labels
    default: return false;
  }
}

int32_t SSDDecodeNMSPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

size_t SSDDecodeNMSPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                            nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                                            int32_t /*nbOutputs*/) const noexcept {
  if (inputs == nullptr || nbInputs != kNbInputs) return 0;
  // Sized for the largest shape of the profile; enqueue asks again for the actual (smaller or equal) shape.
  nms::Shape const shape = shapeFromDims(inputs[0].max, inputs[1].max);
  if (shape.batch <= 0 || shape.anchors <= 0 || shape.classes <= 0) return 0;
  return nms::decode_nms_cuda_workspace_size(kernelDType(inputs[0].desc.type), shape, mParams);
}

char const* SSDDecodeNMSPlugin::getMetadataString() noexcept { return mMetadata.c_str(); }

int32_t SSDDecodeNMSPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                          nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  if (in == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs) return 1;
  std::string const dimsError = checkInputDims(in[0].dims, in[1].dims, in[2].dims);
  if (!dimsError.empty()) {
    logError(dimsError);
    return 1;
  }
  if (char const* problem = nms::validate(shapeFromDims(in[0].dims, in[1].dims), mParams)) {
    logError(problem);
    return 1;
  }
  return 0;
}

int32_t SSDDecodeNMSPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
                                    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs,
                                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr) return 1;
  nms::Shape const shape = shapeFromDims(inputDesc[0].dims, inputDesc[1].dims);
  nms::DType const dtype = kernelDType(inputDesc[0].type);
  size_t const workspaceBytes = nms::decode_nms_cuda_workspace_size(dtype, shape, mParams);
  int const status = nms::decode_nms_cuda(
      dtype, inputs[0], inputs[1], static_cast<float const*>(inputs[2]), shape, mParams, workspace, workspaceBytes,
      static_cast<int32_t*>(outputs[0]), static_cast<float*>(outputs[1]), static_cast<float*>(outputs[2]),
      static_cast<int32_t*>(outputs[3]), static_cast<void*>(stream));
  if (status != 0) {
    logError("decode_nms_cuda failed with cudaError_t " + std::to_string(status));
  }
  return status;
}

nvinfer1::IPluginV3* SSDDecodeNMSPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();  // no per-context resources: the workspace comes from TensorRT
}

nvinfer1::PluginFieldCollection const* SSDDecodeNMSPlugin::getFieldsToSerialize() noexcept {
  return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------------------------
// Creator

SSDDecodeNMSPluginCreator::SSDDecodeNMSPluginCreator() {
  mFieldNames.emplace_back("score_threshold", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("iou_threshold", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("pre_nms_top_k", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("max_detections", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("box_weights", nullptr, PluginFieldType::kFLOAT32, 4);
  mFieldNames.emplace_back("score_activation", nullptr, PluginFieldType::kCHAR, 0);
  mFieldNames.emplace_back("background_class", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("class_agnostic", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("image_size", nullptr, PluginFieldType::kINT32, 2);
  mFieldNameCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldNameCollection.fields = mFieldNames.data();
}

nvinfer1::IPluginV3* SSDDecodeNMSPluginCreator::createPlugin(char const* name,
                                                             nvinfer1::PluginFieldCollection const* fc,
                                                             nvinfer1::TensorRTPhase /*phase*/) noexcept {
  try {
    nms::Params params;
    std::string const error = params_from_fields(fc, params);
    if (!error.empty()) {
      logError(std::string(name != nullptr ? name : "<unnamed>") + ": " + error);
      return nullptr;
    }
    return new SSDDecodeNMSPlugin(params);
  } catch (std::exception const& error) {
    logError(std::string("createPlugin failed: ") + error.what());
  }
  return nullptr;
}

nvinfer1::PluginFieldCollection const* SSDDecodeNMSPluginCreator::getFieldNames() noexcept {
  return &mFieldNameCollection;
}

char const* SSDDecodeNMSPluginCreator::getPluginName() const noexcept { return kPluginName; }
char const* SSDDecodeNMSPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* SSDDecodeNMSPluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

}  // namespace trt
}  // namespace ssdopt

// -----------------------------------------------------------------------------------------------------------------
// Library entry points

namespace {
ssdopt::trt::SSDDecodeNMSPluginCreator& creatorInstance() {
  static ssdopt::trt::SSDDecodeNMSPluginCreator creator;
  return creator;
}
}  // namespace

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creatorInstance()};
  nbCreators = 1;
  return creators;
}

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { ssdopt::trt::gLoggerFinder.store(finder); }

extern "C" bool ssdoptRegisterTensorRTPlugins(nvinfer1::IPluginRegistry* registry) {
  if (registry == nullptr) return false;
  return registry->registerCreator(creatorInstance(), ssdopt::trt::kPluginNamespace);
}
