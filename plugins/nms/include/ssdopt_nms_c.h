/* SSDDecodeNMS CPU kernel behind a plain C ABI, for callers that cannot use C++ (ctypes in the
 * ONNX Runtime binding). Built into libssdopt_nms_cpu.so, which has no framework dependency.
 *
 * Semantics, shapes and attribute defaults: ssdopt_nms.h and ../../shared/DESIGN.md (SSDDecodeNMS).
 *   box_deltas     [B, A, 4]  float32 (dtype 0) or IEEE float16 bits (dtype 1), C-contiguous
 *   class_logits   [B, A, C]  same dtype as box_deltas, C-contiguous
 *   anchors        [A, 4]     float32, (x1, y1, x2, y2) in input pixels
 *   num_detections [B]        int32   (written)
 *   boxes          [B, K, 4]  float32 (written; K = params->max_detections; padding zeros)
 *   scores         [B, K]     float32 (written; padding zeros)
 *   labels         [B, K]     int32   (written; padding -1)
 *
 * ctypes layout of SsdoptNmsParams (all fields 4 bytes, no padding, sizeof == 52):
 *   c_float score_threshold, c_float iou_threshold, c_int32 pre_nms_top_k, c_int32 max_detections,
 *   c_float * 4 box_weights, c_int32 softmax, c_int32 background_class, c_int32 class_agnostic,
 *   c_int32 image_height, c_int32 image_width
 */
#ifndef SSDOPT_NMS_C_H_
#define SSDOPT_NMS_C_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SSDOPT_NMS_C_API __declspec(dllexport)
#else
#define SSDOPT_NMS_C_API __attribute__((visibility("default")))
#endif

/* Bumped whenever SsdoptNmsParams or a signature below changes. */
#define SSDOPT_NMS_C_ABI_VERSION 1

/* dtype codes (equal to ssdopt::nms::DType). */
#define SSDOPT_NMS_DTYPE_FLOAT32 0
#define SSDOPT_NMS_DTYPE_FLOAT16 1

/* Return codes. */
#define SSDOPT_NMS_OK 0
#define SSDOPT_NMS_ERR_INVALID_ARGUMENT 1 /* bad shape/attribute/dtype: see ssdopt_nms_last_error() */
#define SSDOPT_NMS_ERR_NULL_POINTER 2     /* a required pointer was NULL */
#define SSDOPT_NMS_ERR_INTERNAL 3         /* unexpected failure (e.g. out of memory) */

typedef struct SsdoptNmsParams {
  float score_threshold;    /* default 0.01: keep scores > threshold */
  float iou_threshold;      /* default 0.45: IoU > threshold suppresses */
  int32_t pre_nms_top_k;    /* default 400, per class */
  int32_t max_detections;   /* default 200 = K */
  float box_weights[4];     /* default (10, 10, 5, 5) */
  int32_t softmax;          /* 1: softmax over C (default), 0: sigmoid per class */
  int32_t background_class; /* default 0; -1 = none */
  int32_t class_agnostic;   /* 0 (default): NMS per class; 1: across classes */
  int32_t image_height;     /* clip boxes to [0, W] x [0, H] */
  int32_t image_width;
} SsdoptNmsParams;

/* Fills *params with the DESIGN.md defaults (image size 320 x 320). */
SSDOPT_NMS_C_API void ssdopt_nms_params_default(SsdoptNmsParams* params);

/* Returns SSDOPT_NMS_C_ABI_VERSION of the library actually loaded. */
SSDOPT_NMS_C_API int ssdopt_nms_abi_version(void);

/* Runs decode + score activation + per-class threshold/top-k + NMS + final top-K on the CPU.
 * Returns SSDOPT_NMS_OK (0) or an error code; outputs are untouched on error. Thread-safe. */
SSDOPT_NMS_C_API int ssdopt_nms_decode_cpu(int dtype, const void* box_deltas, const void* class_logits,
                                           const float* anchors, int B, int A, int C,
                                           const SsdoptNmsParams* params, int32_t* num_detections,
                                           float* boxes, float* scores, int32_t* labels);

/* Message for the last error on the calling thread ("" when none). Valid until the next call. */
SSDOPT_NMS_C_API const char* ssdopt_nms_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SSDOPT_NMS_C_H_ */
