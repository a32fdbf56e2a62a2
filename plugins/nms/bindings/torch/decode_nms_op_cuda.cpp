// CUDA implementation of torch.ops.ssdopt.decode_nms: workspace from torch's caching allocator,
// kernels enqueued on the current stream, no host synchronisation (capturable in a CUDA graph).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "decode_nms_op.h"

namespace ssdopt {
namespace torch_binding {
namespace {

DetectionTensors decode_nms_cuda_op(const at::Tensor& box_deltas, const at::Tensor& class_logits,
                                    const at::Tensor& anchors, double score_threshold, double iou_threshold,
                                    int64_t pre_nms_top_k, int64_t max_detections, c10::ArrayRef<double> box_weights,
                                    bool softmax, int64_t background_class, bool class_agnostic, int64_t image_height,
                                    int64_t image_width) {
  const c10::cuda::CUDAGuard guard(box_deltas.device());
  const PreparedInputs in = prepare_inputs(box_deltas, class_logits, anchors);
  const nms::Params p = make_params(score_threshold, iou_threshold, pre_nms_top_k, max_detections, box_weights,
                                    softmax, background_class, class_agnostic, image_height, image_width, in.shape);
  auto outputs = empty_outputs(in.shape.batch, p.max_detections, box_deltas.options());
  if (in.shape.batch == 0) return outputs;
  const size_t workspace_bytes = nms::decode_nms_cuda_workspace_size(in.dtype, in.shape, p);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(std::max<size_t>(workspace_bytes, 1))}, box_deltas.options().dtype(at::kByte));
  const int status = nms::decode_nms_cuda(
      in.dtype, in.box_deltas.data_ptr(), in.class_logits.data_ptr(), in.anchors.data_ptr<float>(), in.shape, p,
      workspace.data_ptr(), workspace_bytes, std::get<0>(outputs).data_ptr<int32_t>(),
      std::get<1>(outputs).data_ptr<float>(), std::get<2>(outputs).data_ptr<float>(),
      std::get<3>(outputs).data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "ssdopt::decode_nms (CUDA): kernel launch failed with cudaError ", status);
  return outputs;
}

}  // namespace
}  // namespace torch_binding
}  // namespace ssdopt

TORCH_LIBRARY_IMPL(ssdopt, CUDA, m) { m.impl("decode_nms", &ssdopt::torch_binding::decode_nms_cuda_op); }
