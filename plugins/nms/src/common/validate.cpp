// Shape and attribute checks shared by every binding (ssdopt_nms.h: validate).
#include <cmath>

#include "ssdopt_nms.h"

namespace ssdopt {
namespace nms {

const char* validate(const Shape& shape, const Params& params) {
  if (shape.batch < 0) return "batch size B must be >= 0";
  if (shape.anchors < 0) return "number of anchors A must be >= 0";
  if (shape.classes < 1) return "number of classes C must be >= 1";
  if (params.background_class < -1 || params.background_class >= shape.classes)
    return "background_class must be -1 (none) or a class index in [0, C)";
  if (params.pre_nms_top_k < 1) return "pre_nms_top_k must be >= 1";
  if (params.max_detections < 1) return "max_detections must be >= 1";
  if (std::isnan(params.score_threshold)) return "score_threshold must not be NaN";
  if (std::isnan(params.iou_threshold)) return "iou_threshold must not be NaN";
  for (float w : params.box_weights) {
    if (!std::isfinite(w) || w <= 0.f) return "box_weights must be 4 finite values > 0";
  }
  if (params.image_height < 1 || params.image_width < 1) return "image_height and image_width must be >= 1";
  // Candidate indices are int32 and (class, anchor) pairs must fit in int32 as well.
  if (static_cast<int64_t>(shape.anchors) * shape.classes > INT32_MAX)
    return "A * C must be < 2^31";
  return nullptr;
}

}  // namespace nms
}  // namespace ssdopt
