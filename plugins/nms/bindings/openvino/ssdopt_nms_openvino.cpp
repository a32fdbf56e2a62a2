// SSDDecodeNMS as an OpenVINO extension (libssdopt_nms_openvino.so): an ov::op::Op whose evaluate() runs the
// C++ CPU kernel, plus the ONNX frontend conversion for ssdopt::SSDDecodeNMS nodes.
//
//   core.add_extension("libssdopt_nms_openvino.so"); core.read_model("model.onnx")
//
// Inputs : box_deltas [B, A, 4] f32|f16|bf16 · class_logits [B, A, C] same type · anchors [A, 4] f32
//          (bf16 inputs and f16/bf16 anchors are widened to f32 here; the kernel reads f32 and f16)
// Outputs: num_detections [B] i32 · boxes [B, K, 4] f32 · scores [B, K] f32 · labels [B, K] i32
// (K = max_detections; B may be dynamic). Attributes keep their ONNX names and types (DESIGN.md), so a model
// saved as IR round-trips through visit_attributes.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/extension/conversion.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>
#include <openvino/op/op.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ssdopt_nms.h"

namespace ssdopt {
namespace openvino {

// Attribute values under their ONNX names, with the DESIGN.md defaults.
struct DecodeNMSAttributes {
  float score_threshold = 0.01f;
  float iou_threshold = 0.45f;
  int64_t pre_nms_top_k = 400;
  int64_t max_detections = 200;
  std::vector<float> box_weights{10.f, 10.f, 5.f, 5.f};
  std::string score_activation = "softmax";
  int64_t background_class = 0;
  int64_t class_agnostic = 0;
  std::vector<int64_t> image_size{320, 320};
};

class SSDDecodeNMS : public ov::op::Op {
 public:
  OPENVINO_OP("SSDDecodeNMS", "ssdopt");

  SSDDecodeNMS() = default;
  SSDDecodeNMS(const ov::OutputVector& inputs, DecodeNMSAttributes attributes)
      : Op(inputs), m_attributes(std::move(attributes)) {
    constructor_validate_and_infer_types();
  }

  const DecodeNMSAttributes& attributes() const { return m_attributes; }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 3,
                          "SSDDecodeNMS takes 3 inputs (box_deltas, class_logits, anchors), got ", get_input_size());
    check_attributes();
    const ov::element::Type deltas_type = get_input_element_type(0);
    const ov::element::Type logits_type = get_input_element_type(1);
    NODE_VALIDATION_CHECK(this, is_float_input(deltas_type) && is_float_input(logits_type),
                          "box_deltas and class_logits must be f32, f16 or bf16; got ", deltas_type, " and ",
                          logits_type);
    const ov::element::Type anchors_type = get_input_element_type(2);
    NODE_VALIDATION_CHECK(this, is_float_input(anchors_type), "anchors must be f32 (f16, bf16 are widened), got ",
                          anchors_type);

    const ov::PartialShape& deltas = get_input_partial_shape(0);
    const ov::PartialShape& logits = get_input_partial_shape(1);
    const ov::PartialShape& anchors = get_input_partial_shape(2);
    NODE_VALIDATION_CHECK(this, deltas.rank().compatible(3) && logits.rank().compatible(3) &&
                                    anchors.rank().compatible(2),
                          "expected box_deltas [B, A, 4], class_logits [B, A, C], anchors [A, 4]; got ", deltas,
                          ", ", logits, ", ", anchors);
    ov::Dimension batch = ov::Dimension::dynamic();
    if (deltas.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, deltas[2].compatible(4), "box_deltas must be [B, A, 4], got ", deltas);
      batch = deltas[0];
    }
    if (logits.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, ov::Dimension::merge(batch, batch, logits[0]),
                            "box_deltas and class_logits must have the same batch size; got ", deltas, ", ", logits);
      if (deltas.rank().is_static()) {
        NODE_VALIDATION_CHECK(this, deltas[1].compatible(logits[1]),
                              "box_deltas and class_logits must have the same number of anchors; got ", deltas,
                              ", ", logits);
      }
    }
    if (anchors.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, anchors[1].compatible(4), "anchors must be [A, 4], got ", anchors);
    }

    const ov::Dimension k(m_attributes.max_detections);
    set_output_type(0, ov::element::i32, ov::PartialShape{batch});
    set_output_type(1, ov::element::f32, ov::PartialShape{batch, k, 4});
    set_output_type(2, ov::element::f32, ov::PartialShape{batch, k});
    set_output_type(3, ov::element::i32, ov::PartialShape{batch, k});
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override {
    check_new_args_count(this, new_args);
    return std::make_shared<SSDDecodeNMS>(new_args, m_attributes);
  }

  bool visit_attributes(ov::AttributeVisitor& visitor) override {
    visitor.on_attribute("score_threshold", m_attributes.score_threshold);
    visitor.on_attribute("iou_threshold", m_attributes.iou_threshold);
    visitor.on_attribute("pre_nms_top_k", m_attributes.pre_nms_top_k);
    visitor.on_attribute("max_detections", m_attributes.max_detections);
    visitor.on_attribute("box_weights", m_attributes.box_weights);
    visitor.on_attribute("score_activation", m_attributes.score_activation);
    visitor.on_attribute("background_class", m_attributes.background_class);
    visitor.on_attribute("class_agnostic", m_attributes.class_agnostic);
    visitor.on_attribute("image_size", m_attributes.image_size);
    return true;
  }

  bool has_evaluate() const override {
    return is_float_input(get_input_element_type(0)) && is_float_input(get_input_element_type(1)) &&
           is_float_input(get_input_element_type(2));
  }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    OPENVINO_ASSERT(inputs.size() == 3 && outputs.size() == 4, "SSDDecodeNMS: expected 3 inputs, 4 outputs");
    const ov::Shape& logits_shape = inputs[1].get_shape();
    const ov::Shape& deltas_shape = inputs[0].get_shape();
    const ov::Shape& anchors_shape = inputs[2].get_shape();
    const bool shapes_agree = logits_shape.size() == 3 && deltas_shape.size() == 3 && anchors_shape.size() == 2 &&
                              deltas_shape[0] == logits_shape[0] && deltas_shape[1] == logits_shape[1] &&
                              deltas_shape[2] == 4 && anchors_shape[0] == logits_shape[1] && anchors_shape[1] == 4;
    OPENVINO_ASSERT(shapes_agree, "SSDDecodeNMS: expected box_deltas [B, A, 4], class_logits [B, A, C], anchors [A, 4]; got ",
                    deltas_shape, ", ", logits_shape, ", ", anchors_shape);
    nms::Shape shape;
    shape.batch = static_cast<int32_t>(logits_shape[0]);
    shape.anchors = static_cast<int32_t>(logits_shape[1]);
    shape.classes = static_cast<int32_t>(logits_shape[2]);
    const nms::Params params = kernel_params();
    if (const char* problem = nms::validate(shape, params)) {
      OPENVINO_THROW("SSDDecodeNMS (", get_friendly_name(), "): ", problem);
    }

    const size_t batch = logits_shape[0];
    const size_t k = static_cast<size_t>(m_attributes.max_detections);
    outputs[0].set_shape(ov::Shape{batch});
    outputs[1].set_shape(ov::Shape{batch, k, 4});
    outputs[2].set_shape(ov::Shape{batch, k});
    outputs[3].set_shape(ov::Shape{batch, k});

    // f32 and f16 go to the kernel as they are; the kernel has no bf16 path (and takes f32 anchors only), so
    // those are widened to f32 here.
    const ov::element::Type deltas_type = inputs[0].get_element_type();
    const ov::element::Type logits_type = inputs[1].get_element_type();
    std::vector<float> deltas_f32, logits_f32, anchors_f32;
    const void* deltas = inputs[0].data();
    const void* logits = inputs[1].data();
    const void* anchors = inputs[2].data();
    if (inputs[2].get_element_type() != ov::element::f32) anchors = widen_to_f32(inputs[2], anchors_f32);
    nms::DType dtype = nms::DType::kFloat32;
    if (deltas_type == ov::element::f16 && logits_type == ov::element::f16) {
      dtype = nms::DType::kFloat16;
    } else {
      if (deltas_type != ov::element::f32) deltas = widen_to_f32(inputs[0], deltas_f32);
      if (logits_type != ov::element::f32) logits = widen_to_f32(inputs[1], logits_f32);
    }
    nms::decode_nms_cpu(dtype, deltas, logits, static_cast<const float*>(anchors), shape, params,
                        outputs[0].data<int32_t>(), outputs[1].data<float>(), outputs[2].data<float>(),
                        outputs[3].data<int32_t>());
    return true;
  }

  nms::Params kernel_params() const {
    nms::Params params;
    params.score_threshold = m_attributes.score_threshold;
    params.iou_threshold = m_attributes.iou_threshold;
    params.pre_nms_top_k = static_cast<int32_t>(m_attributes.pre_nms_top_k);
    params.max_detections = static_cast<int32_t>(m_attributes.max_detections);
    for (size_t i = 0; i < 4; ++i) params.box_weights[i] = m_attributes.box_weights.at(i);
    params.softmax = m_attributes.score_activation == "softmax";
    params.background_class = static_cast<int32_t>(m_attributes.background_class);
    params.class_agnostic = m_attributes.class_agnostic != 0;
    params.image_height = static_cast<int32_t>(m_attributes.image_size.at(0));
    params.image_width = static_cast<int32_t>(m_attributes.image_size.at(1));
    return params;
  }

 private:
  static bool is_float_input(const ov::element::Type& type) {
    return type.is_dynamic() || type == ov::element::f32 || type == ov::element::f16 || type == ov::element::bf16;
  }

  static const void* widen_to_f32(const ov::Tensor& tensor, std::vector<float>& storage) {
    storage.resize(tensor.get_size());
    if (tensor.get_element_type() == ov::element::f16) {
      const ov::float16* values = tensor.data<const ov::float16>();
      for (size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<float>(values[i]);
    } else if (tensor.get_element_type() == ov::element::bf16) {
      const ov::bfloat16* values = tensor.data<const ov::bfloat16>();
      for (size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<float>(values[i]);
    } else {
      OPENVINO_THROW("SSDDecodeNMS: unsupported input element type ", tensor.get_element_type());
    }
    return storage.data();
  }

  void check_attributes() const {
    const DecodeNMSAttributes& a = m_attributes;
    NODE_VALIDATION_CHECK(this, a.score_activation == "softmax" || a.score_activation == "sigmoid",
                          "score_activation must be \"softmax\" or \"sigmoid\", got \"", a.score_activation, "\"");
    NODE_VALIDATION_CHECK(this, a.box_weights.size() == 4, "box_weights must have 4 values, got ",
                          a.box_weights.size());
    NODE_VALIDATION_CHECK(this, a.image_size.size() == 2, "image_size must be [H, W], got ", a.image_size.size(),
                          " values");
    NODE_VALIDATION_CHECK(this, a.max_detections >= 1 && a.max_detections <= INT32_MAX,
                          "max_detections must be in [1, 2^31), got ", a.max_detections);
    NODE_VALIDATION_CHECK(this, a.pre_nms_top_k >= 1 && a.pre_nms_top_k <= INT32_MAX,
                          "pre_nms_top_k must be in [1, 2^31), got ", a.pre_nms_top_k);
    NODE_VALIDATION_CHECK(this, a.class_agnostic == 0 || a.class_agnostic == 1, "class_agnostic must be 0 or 1");
  }

  DecodeNMSAttributes m_attributes;
};

// A list-of-floats attribute: the ONNX frontend hands FLOATS over as std::vector<double> (OpenVINO 2026.4),
// other frontends may use std::vector<float>.
std::vector<float> float_list_attribute(const ov::frontend::NodeContext& node, const std::string& name,
                                        const std::vector<float>& fallback) {
  const ov::Any value = node.get_attribute_as_any(name);
  if (value.empty()) return fallback;
  if (value.is<std::vector<float>>()) return value.as<std::vector<float>>();
  if (value.is<std::vector<double>>()) {
    const auto& doubles = value.as<std::vector<double>>();
    return std::vector<float>(doubles.begin(), doubles.end());
  }
  return node.get_attribute<std::vector<float>>(name);  // throws, naming both types
}

// ONNX frontend: ssdopt::SSDDecodeNMS node -> SSDDecodeNMS op (absent attributes take the defaults;
// plugin_version / plugin_namespace, which only TensorRT reads, are ignored).
ov::OutputVector convert_onnx_node(const ov::frontend::NodeContext& node) {
  const DecodeNMSAttributes defaults;
  DecodeNMSAttributes a;
  a.score_threshold = node.get_attribute<float>("score_threshold", defaults.score_threshold);
  a.iou_threshold = node.get_attribute<float>("iou_threshold", defaults.iou_threshold);
  a.pre_nms_top_k = node.get_attribute<int64_t>("pre_nms_top_k", defaults.pre_nms_top_k);
  a.max_detections = node.get_attribute<int64_t>("max_detections", defaults.max_detections);
  a.box_weights = float_list_attribute(node, "box_weights", defaults.box_weights);
  a.score_activation = node.get_attribute<std::string>("score_activation", defaults.score_activation);
  a.background_class = node.get_attribute<int64_t>("background_class", defaults.background_class);
  a.class_agnostic = node.get_attribute<int64_t>("class_agnostic", defaults.class_agnostic);
  a.image_size = node.get_attribute<std::vector<int64_t>>("image_size", defaults.image_size);
  FRONT_END_GENERAL_CHECK(node.get_input_size() == 3, "SSDDecodeNMS node takes 3 inputs, got ",
                          node.get_input_size());
  auto op = std::make_shared<SSDDecodeNMS>(ov::OutputVector{node.get_input(0), node.get_input(1), node.get_input(2)},
                                           std::move(a));
  return op->outputs();
}

}  // namespace openvino
}  // namespace ssdopt

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<ssdopt::openvino::SSDDecodeNMS>>(),
     std::make_shared<ov::frontend::onnx::ConversionExtension>("SSDDecodeNMS", "ssdopt",
                                                                ssdopt::openvino::convert_onnx_node)}));
