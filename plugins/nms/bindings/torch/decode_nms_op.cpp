// torch.ops.ssdopt.decode_nms: schema and the CPU implementation (calls nms::decode_nms_cpu).
// The fake (meta) implementation lives in Python (ssdopt/ops/library.py, torch.library.register_fake)
// so torch.export and AOTInductor can trace the op without running it.
#include "decode_nms_op.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <stdexcept>

namespace ssdopt {
namespace torch_binding {

PreparedInputs prepare_inputs(const at::Tensor& box_deltas, const at::Tensor& class_logits,
                              const at::Tensor& anchors) {
  TORCH_CHECK(box_deltas.dim() == 3 && box_deltas.size(2) == 4, "ssdopt::decode_nms: box_deltas must be [B, A, 4], got ",
              box_deltas.sizes());
  TORCH_CHECK(class_logits.dim() == 3, "ssdopt::decode_nms: class_logits must be [B, A, C], got ", class_logits.sizes());
  TORCH_CHECK(class_logits.size(0) == box_deltas.size(0) && class_logits.size(1) == box_deltas.size(1),
              "ssdopt::decode_nms: box_deltas ", box_deltas.sizes(), " and class_logits ", class_logits.sizes(),
              " disagree on B or A");
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == 4 && anchors.size(0) == box_deltas.size(1),
              "ssdopt::decode_nms: anchors must be [A, 4] with A = ", box_deltas.size(1), ", got ", anchors.sizes());
  TORCH_CHECK(box_deltas.device() == class_logits.device() && box_deltas.device() == anchors.device(),
              "ssdopt::decode_nms: box_deltas, class_logits and anchors must be on one device");
  TORCH_CHECK(at::isFloatingType(box_deltas.scalar_type()) && at::isFloatingType(class_logits.scalar_type()),
              "ssdopt::decode_nms: box_deltas and class_logits must be floating point");
  const bool half = box_deltas.scalar_type() == at::kHalf && class_logits.scalar_type() == at::kHalf;
  const auto compute = half ? at::kHalf : at::kFloat;
  PreparedInputs in;
  in.box_deltas = box_deltas.to(compute).contiguous();
  in.class_logits = class_logits.to(compute).contiguous();
  in.anchors = anchors.to(at::kFloat).contiguous();
  in.dtype = half ? nms::DType::kFloat16 : nms::DType::kFloat32;
  in.shape = nms::Shape{static_cast<int32_t>(box_deltas.size(0)), static_cast<int32_t>(box_deltas.size(1)),
                        static_cast<int32_t>(class_logits.size(2))};
  return in;
}

nms::Params make_params(double score_threshold, double iou_threshold, int64_t pre_nms_top_k,
                        int64_t max_detections, c10::ArrayRef<double> box_weights, bool softmax,
                        int64_t background_class, bool class_agnostic, int64_t image_height,
                        int64_t image_width, const nms::Shape& shape) {
  TORCH_CHECK(box_weights.size() == 4, "ssdopt::decode_nms: box_weights must hold 4 values, got ", box_weights.size());
  nms::Params p;
  p.score_threshold = static_cast<float>(score_threshold);
  p.iou_threshold = static_cast<float>(iou_threshold);
  p.pre_nms_top_k = static_cast<int32_t>(std::min<int64_t>(pre_nms_top_k, INT32_MAX));
  p.max_detections = static_cast<int32_t>(std::min<int64_t>(max_detections, INT32_MAX));
  for (int i = 0; i < 4; ++i) p.box_weights[i] = static_cast<float>(box_weights[i]);
  p.softmax = softmax;
  p.background_class = static_cast<int32_t>(background_class);
  p.class_agnostic = class_agnostic;
  p.image_height = static_cast<int32_t>(image_height);
  p.image_width = static_cast<int32_t>(image_width);
  const char* problem = nms::validate(shape, p);
  TORCH_CHECK(problem == nullptr, "ssdopt::decode_nms: ", problem ? problem : "");
  return p;
}

DetectionTensors empty_outputs(int64_t batch, int64_t max_detections, const at::TensorOptions& options) {
  return {at::empty({batch}, options.dtype(at::kInt)), at::empty({batch, max_detections, 4}, options.dtype(at::kFloat)),
          at::empty({batch, max_detections}, options.dtype(at::kFloat)),
          at::empty({batch, max_detections}, options.dtype(at::kInt))};
}

namespace {

DetectionTensors decode_nms_cpu_op(const at::Tensor& box_deltas, const at::Tensor& class_logits,
                                   const at::Tensor& anchors, double score_threshold, double iou_threshold,
                                   int64_t pre_nms_top_k, int64_t max_detections, c10::ArrayRef<double> box_weights,
                                   bool softmax, int64_t background_class, bool class_agnostic, int64_t image_height,
                                   int64_t image_width) {
  const PreparedInputs in = prepare_inputs(box_deltas, class_logits, anchors);
  const nms::Params p = make_params(score_threshold, iou_threshold, pre_nms_top_k, max_detections, box_weights,
                                    softmax, background_class, class_agnostic, image_height, image_width, in.shape);
  auto outputs = empty_outputs(in.shape.batch, p.max_detections, box_deltas.options());
  try {
    nms::decode_nms_cpu(in.dtype, in.box_deltas.data_ptr(), in.class_logits.data_ptr(),
                        in.anchors.data_ptr<float>(), in.shape, p, std::get<0>(outputs).data_ptr<int32_t>(),
                        std::get<1>(outputs).data_ptr<float>(), std::get<2>(outputs).data_ptr<float>(),
                        std::get<3>(outputs).data_ptr<int32_t>());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "ssdopt::decode_nms (CPU): ", e.what());
  }
  return outputs;
}

}  // namespace
}  // namespace torch_binding
}  // namespace ssdopt

TORCH_LIBRARY(ssdopt, m) {
  m.def(
      "decode_nms(Tensor box_deltas, Tensor class_logits, Tensor anchors, float score_threshold, "
      "float iou_threshold, int pre_nms_top_k, int max_detections, float[] box_weights, bool softmax, "
      "int background_class, bool class_agnostic, int image_height, int image_width) "
      "-> (Tensor num_detections, Tensor boxes, Tensor scores, Tensor labels)");
}

TORCH_LIBRARY_IMPL(ssdopt, CPU, m) { m.impl("decode_nms", &ssdopt::torch_binding::decode_nms_cpu_op); }
