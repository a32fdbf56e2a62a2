// Shared pieces of the torch binding: argument checks and the Params/Shape built from op arguments.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>

#include "ssdopt_nms.h"

namespace ssdopt {
namespace torch_binding {

using DetectionTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks shapes/dtypes/devices; returns the inputs made contiguous (anchors as float32, deltas and
// logits as float32 unless both are float16).
struct PreparedInputs {
  at::Tensor box_deltas, class_logits, anchors;
  nms::DType dtype;
  nms::Shape shape;
};
PreparedInputs prepare_inputs(const at::Tensor& box_deltas, const at::Tensor& class_logits,
                              const at::Tensor& anchors);

nms::Params make_params(double score_threshold, double iou_threshold, int64_t pre_nms_top_k,
                        int64_t max_detections, c10::ArrayRef<double> box_weights, bool softmax,
                        int64_t background_class, bool class_agnostic, int64_t image_height,
                        int64_t image_width, const nms::Shape& shape);

// Uninitialised outputs on `options.device()`: num [B] int32, boxes [B, K, 4], scores [B, K], labels [B, K] int32.
DetectionTensors empty_outputs(int64_t batch, int64_t max_detections, const at::TensorOptions& options);

}  // namespace torch_binding
}  // namespace ssdopt
