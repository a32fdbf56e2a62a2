// SSDDecodeNMS kernels: the one contract every binding (torch, ONNX Runtime, OpenVINO, TensorRT) calls.
//
// Semantics: torchvision SSD.postprocess_detections for softmax heads (see ../../shared/DESIGN.md
// section SSDDecodeNMS and ssdopt/ops/reference.py). Shapes:
//   box_deltas   [B, A, 4]  float32 or float16, (dx, dy, dw, dh) in torchvision BoxCoder convention
//   class_logits [B, A, C]  float32 or float16
//   anchors      [A, 4]     float32, (x1, y1, x2, y2) in input pixels
// Outputs (fixed size, K = max_detections, padding: zeros and label -1):
//   num_detections [B] int32, boxes [B, K, 4] float32, scores [B, K] float32, labels [B, K] int32
//
// Numerics (identical in the CPU and CUDA kernels; tested against the reference in tests/ops/):
//   * float16 inputs are converted to float32 first; all arithmetic is float32, box formulas shared
//     (src/common/box_math.h). CPU and CUDA differ only by the last bits of exp(): a detection whose
//     score or IoU sits on a threshold can flip; everything else matches.
//   * Softmax of an anchor whose logits hold NaN or +inf, or are all -inf, is NaN: that anchor yields no
//     detection. -inf alone is a probability of 0. Sigmoid: NaN -> none, +inf -> 1, -inf -> 0.
//   * NaN box deltas give NaN boxes, which are kept and never suppress or get suppressed (torchvision).
//   * dw, dh are clamped at log(1000/16) before exp; boxes are clipped to [0, W] x [0, H].
//   * Equal scores rank by class, then anchor index, ascending (CPU and CUDA alike).
//   * IoU > iou_threshold suppresses (IoU equal to it does not); zero/negative-area boxes follow
//     torchvision's nms arithmetic (two identical zero-area boxes: 0/0 = NaN, neither suppressed).
// Also: include/ssdopt_nms_c.h, the same CPU kernel behind a C ABI (libssdopt_nms_cpu.so).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ssdopt {
namespace nms {

enum class DType : int { kFloat32 = 0, kFloat16 = 1 };

struct Params {
  float score_threshold = 0.01f;
  float iou_threshold = 0.45f;
  int32_t pre_nms_top_k = 400;
  int32_t max_detections = 200;
  float box_weights[4] = {10.f, 10.f, 5.f, 5.f};
  bool softmax = true;            // false: sigmoid
  int32_t background_class = 0;   // -1: no background class
  bool class_agnostic = false;
  int32_t image_height = 320;
  int32_t image_width = 320;
};

struct Shape {
  int32_t batch = 0;    // B
  int32_t anchors = 0;  // A
  int32_t classes = 0;  // C
};

// Returns nullptr when params/shape are valid, else a static message saying what is wrong.
const char* validate(const Shape& shape, const Params& params);

// CPU kernel (C++17, no framework dependency). Inputs of dtype kFloat16 are IEEE half bit patterns.
void decode_nms_cpu(DType dtype, const void* box_deltas, const void* class_logits, const float* anchors,
                    const Shape& shape, const Params& params, int32_t* num_detections, float* boxes,
                    float* scores, int32_t* labels);

#ifdef SSDOPT_WITH_CUDA
// Bytes of device workspace decode_nms_cuda needs; depends only on shape, params and dtype.
size_t decode_nms_cuda_workspace_size(DType dtype, const Shape& shape, const Params& params);

// Asynchronous on `stream` (a cudaStream_t); no host synchronisation, capturable in a CUDA graph.
// Returns a cudaError_t as int (0 = success).
int decode_nms_cuda(DType dtype, const void* box_deltas, const void* class_logits, const float* anchors,
                    const Shape& shape, const Params& params, void* workspace, size_t workspace_bytes,
                    int32_t* num_detections, float* boxes, float* scores, int32_t* labels, void* stream);
#endif

}  // namespace nms
}  // namespace ssdopt
