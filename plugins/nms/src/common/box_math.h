// Box arithmetic shared by the CPU and CUDA kernels, written once so both round identically.
//
// Every formula follows torchvision operation by operation, in float32:
//   BoxCoder.decode_single (dw, dh clamped at log(1000/16)), clip_boxes_to_image (clamp keeps NaN),
//   and the IoU of ops/cpu/nms_kernel.cpp (std::max/std::min argument order kept, so NaN behaves alike).
// Build with -ffp-contract=off (host) / --fmad=false (device) so no FMA changes a rounding.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SSDOPT_HD __host__ __device__ __forceinline__
#else
#define SSDOPT_HD inline
#endif

namespace ssdopt {
namespace nms {

// float32(log(1000 / 16)), torchvision's bbox_xform_clip as torch.clamp sees it on a float tensor.
constexpr float kBoxExpClip = 4.135166556742356f;

struct Box {
  float x1, y1, x2, y2;
};

// std::max / std::min semantics (first argument returned unless the comparison is true).
SSDOPT_HD float max_like_std(float a, float b) { return (a < b) ? b : a; }
SSDOPT_HD float min_like_std(float a, float b) { return (b < a) ? b : a; }

// torch.clamp(x, max=hi): NaN stays NaN.
SSDOPT_HD float clamp_max_keep_nan(float x, float hi) { return (x > hi) ? hi : x; }
// torch.clamp(x, min=lo, max=hi): NaN stays NaN.
SSDOPT_HD float clamp_keep_nan(float x, float lo, float hi) {
  x = (x < lo) ? lo : x;
  return (x > hi) ? hi : x;
}

SSDOPT_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

// deltas (dx, dy, dw, dh) against anchor (x1, y1, x2, y2); weights (wx, wy, ww, wh);
// clipped to [0, width] x [0, height].
SSDOPT_HD Box decode_and_clip(float dx, float dy, float dw, float dh, const float* anchor,
                              const float* weights, float width, float height) {
  const float widths = anchor[2] - anchor[0];
  const float heights = anchor[3] - anchor[1];
  const float ctr_x = anchor[0] + 0.5f * widths;
  const float ctr_y = anchor[1] + 0.5f * heights;
  dx = dx / weights[0];
  dy = dy / weights[1];
  dw = clamp_max_keep_nan(dw / weights[2], kBoxExpClip);
  dh = clamp_max_keep_nan(dh / weights[3], kBoxExpClip);
  const float pred_ctr_x = dx * widths + ctr_x;
  const float pred_ctr_y = dy * heights + ctr_y;
  const float pred_w = exp_f32(dw) * widths;
  const float pred_h = exp_f32(dh) * heights;
  const float half_w = 0.5f * pred_w;
  const float half_h = 0.5f * pred_h;
  Box box;
  box.x1 = clamp_keep_nan(pred_ctr_x - half_w, 0.f, width);
  box.y1 = clamp_keep_nan(pred_ctr_y - half_h, 0.f, height);
  box.x2 = clamp_keep_nan(pred_ctr_x + half_w, 0.f, width);
  box.y2 = clamp_keep_nan(pred_ctr_y + half_h, 0.f, height);
  return box;
}

SSDOPT_HD float box_area(const Box& b) { return (b.x2 - b.x1) * (b.y2 - b.y1); }

// True when IoU(a, b) > threshold, torchvision's CPU nms arithmetic (a is the higher-scored box).
// NaN anywhere gives false: a NaN box never suppresses and is never suppressed.
SSDOPT_HD bool iou_above(const Box& a, float area_a, const Box& b, float area_b, float threshold) {
  const float xx1 = max_like_std(a.x1, b.x1);
  const float yy1 = max_like_std(a.y1, b.y1);
  const float xx2 = min_like_std(a.x2, b.x2);
  const float yy2 = min_like_std(a.y2, b.y2);
  const float w = max_like_std(0.f, xx2 - xx1);
  const float h = max_like_std(0.f, yy2 - yy1);
  const float inter = w * h;
  const float iou = inter / (area_a + area_b - inter);
  return iou > threshold;
}

// Candidate order everywhere: score descending, then class ascending, then anchor ascending.
SSDOPT_HD bool ranks_before(float score_a, int class_a, int anchor_a, float score_b, int class_b,
                            int anchor_b) {
  if (score_a != score_b) return score_a > score_b;
  if (class_a != class_b) return class_a < class_b;
  return anchor_a < anchor_b;
}

}  // namespace nms
}  // namespace ssdopt
