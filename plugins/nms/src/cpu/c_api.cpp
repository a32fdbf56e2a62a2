// Plain C ABI over the CPU kernel (ssdopt_nms_c.h), for ctypes callers.
#include <exception>
#include <new>
#include <string>

#include "ssdopt_nms.h"
#include "ssdopt_nms_c.h"

namespace {

thread_local std::string last_error;

int fail(int code, const char* message) {
  last_error = message;
  return code;
}

ssdopt::nms::Params to_params(const SsdoptNmsParams& p) {
  ssdopt::nms::Params out;
  out.score_threshold = p.score_threshold;
  out.iou_threshold = p.iou_threshold;
  out.pre_nms_top_k = p.pre_nms_top_k;
  out.max_detections = p.max_detections;
  for (int i = 0; i < 4; ++i) out.box_weights[i] = p.box_weights[i];
  out.softmax = p.softmax != 0;
  out.background_class = p.background_class;
  out.class_agnostic = p.class_agnostic != 0;
  out.image_height = p.image_height;
  out.image_width = p.image_width;
  return out;
}

}  // namespace

static_assert(sizeof(SsdoptNmsParams) == 52, "SsdoptNmsParams layout is part of the ABI");

extern "C" {

void ssdopt_nms_params_default(SsdoptNmsParams* params) {
  if (params == nullptr) return;
  const ssdopt::nms::Params d;
  params->score_threshold = d.score_threshold;
  params->iou_threshold = d.iou_threshold;
  params->pre_nms_top_k = d.pre_nms_top_k;
  params->max_detections = d.max_detections;
  for (int i = 0; i < 4; ++i) params->box_weights[i] = d.box_weights[i];
  params->softmax = d.softmax ? 1 : 0;
  params->background_class = d.background_class;
  params->class_agnostic = d.class_agnostic ? 1 : 0;
  params->image_height = d.image_height;
  params->image_width = d.image_width;
}

int ssdopt_nms_abi_version(void) { return SSDOPT_NMS_C_ABI_VERSION; }

int ssdopt_nms_decode_cpu(int dtype, const void* box_deltas, const void* class_logits, const float* anchors,
                          int B, int A, int C, const SsdoptNmsParams* params, int32_t* num_detections,
                          float* boxes, float* scores, int32_t* labels) {
  last_error.clear();
  if (dtype != SSDOPT_NMS_DTYPE_FLOAT32 && dtype != SSDOPT_NMS_DTYPE_FLOAT16)
    return fail(SSDOPT_NMS_ERR_INVALID_ARGUMENT, "dtype must be 0 (float32) or 1 (float16)");
  if (params == nullptr || num_detections == nullptr || boxes == nullptr || scores == nullptr ||
      labels == nullptr)
    return fail(SSDOPT_NMS_ERR_NULL_POINTER, "params and all four output pointers must be non-NULL");
  if (B > 0 && A > 0 && (box_deltas == nullptr || class_logits == nullptr || anchors == nullptr))
    return fail(SSDOPT_NMS_ERR_NULL_POINTER, "box_deltas, class_logits and anchors must be non-NULL");
  const ssdopt::nms::Shape shape{B, A, C};
  const ssdopt::nms::Params p = to_params(*params);
  if (const char* problem = ssdopt::nms::validate(shape, p)) return fail(SSDOPT_NMS_ERR_INVALID_ARGUMENT, problem);
  try {
    ssdopt::nms::decode_nms_cpu(static_cast<ssdopt::nms::DType>(dtype), box_deltas, class_logits, anchors, shape,
                                p, num_detections, boxes, scores, labels);
  } catch (const std::bad_alloc&) {
    return fail(SSDOPT_NMS_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return fail(SSDOPT_NMS_ERR_INTERNAL, e.what());
  } catch (...) {
    return fail(SSDOPT_NMS_ERR_INTERNAL, "unknown C++ exception");
  }
  return SSDOPT_NMS_OK;
}

const char* ssdopt_nms_last_error(void) { return last_error.c_str(); }

}  // extern "C"
