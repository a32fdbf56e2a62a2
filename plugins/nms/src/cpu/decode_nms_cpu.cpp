// SSDDecodeNMS on the CPU: C++17, no framework dependency (ssdopt_nms.h: decode_nms_cpu).
//
// Per image: activation + threshold into per-class candidate lists, per-class top-k
// (nth_element), decode only the candidates (cached per anchor), greedy NMS per class that stops
// once a class has max_detections survivors (no later one can reach the final top-K), then the
// final top-K. Images run in parallel on std::threads (SSDOPT_NMS_THREADS caps their number).
#include <algorithm>
#include <cstdlib>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../common/box_math.h"
#include "../common/half.h"
#include "ssdopt_nms.h"

namespace ssdopt {
namespace nms {

const float* half_to_float_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_bits_to_float(static_cast<uint16_t>(i));
    return t;
  }();
  return table.data();
}

namespace {

struct Candidate {
  float score;
  int32_t cls;
  int32_t anchor;
};

inline bool candidate_before(const Candidate& a, const Candidate& b) {
  return ranks_before(a.score, a.cls, a.anchor, b.score, b.cls, b.anchor);
}

struct Detection {
  Candidate candidate;
  Box box;
};

// Reads float32 or float16 inputs as float32.
struct InputReader {
  DType dtype;
  const void* data;
  const float* half_table;

  float at(size_t i) const {
    if (dtype == DType::kFloat32) return static_cast<const float*>(data)[i];
    return half_table[static_cast<const uint16_t*>(data)[i]];
  }
  void row(size_t offset, int32_t n, float* out) const {
    if (dtype == DType::kFloat32) {
      const float* src = static_cast<const float*>(data) + offset;
      std::copy(src, src + n, out);
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(data) + offset;
      for (int32_t i = 0; i < n; ++i) out[i] = half_table[src[i]];
    }
  }
};

// Boxes of one NMS group, structure-of-arrays so the suppression loop vectorises.
struct BoxColumns {
  std::vector<float> x1, y1, x2, y2, area;
  void resize(size_t n) {
    x1.resize(n);
    y1.resize(n);
    x2.resize(n);
    y2.resize(n);
    area.resize(n);
  }
};

// removed[j] |= IoU(i, j) > threshold for j in [begin, end): iou_above() written branch-free (same
// operations, same rounding), so the compiler vectorises it; an AVX2 clone is picked at run time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void suppress_row(const float* __restrict x1, const float* __restrict y1, const float* __restrict x2,
                  const float* __restrict y2, const float* __restrict area, size_t i, size_t begin, size_t end,
                  float threshold, uint8_t* __restrict removed) {
  const float ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
  for (size_t j = begin; j < end; ++j) {
    const float xx1 = ix1 < x1[j] ? x1[j] : ix1;  // max_like_std(ix1, x1[j])
    const float yy1 = iy1 < y1[j] ? y1[j] : iy1;
    const float xx2 = x2[j] < ix2 ? x2[j] : ix2;  // min_like_std(ix2, x2[j])
    const float yy2 = y2[j] < iy2 ? y2[j] : iy2;
    const float dw = xx2 - xx1, dh = yy2 - yy1;
    const float w = 0.f < dw ? dw : 0.f;  // max_like_std(0, dw)
    const float h = 0.f < dh ? dh : 0.f;
    const float inter = w * h;
    const float iou = inter / (iarea + area[j] - inter);
    removed[j] |= static_cast<uint8_t>(iou > threshold);
  }
}

// Scratch memory of one worker thread, reused across the images it processes.
class ImageWorker {
 public:
  ImageWorker(const Shape& shape, const Params& params, const InputReader& deltas,
              const InputReader& logits, const float* anchors)
      : shape_(shape), params_(params), deltas_(deltas), logits_(logits), anchors_(anchors),
        activations_(shape.classes), per_class_(shape.classes), boxes_(shape.anchors),
        decoded_(shape.anchors, 0) {}

  void run(int32_t image, int32_t* num_detections, float* boxes, float* scores, int32_t* labels) {
    collect_candidates(image);
    keep_top_k_per_class();
    std::fill(decoded_.begin(), decoded_.end(), 0);
    kept_.clear();
    if (params_.class_agnostic) {
      merged_.clear();
      for (const auto& list : per_class_) merged_.insert(merged_.end(), list.begin(), list.end());
      std::sort(merged_.begin(), merged_.end(), candidate_before);
      greedy_nms(image, merged_);
    } else {
      for (const auto& list : per_class_) greedy_nms(image, list);
    }
    write_outputs(image, num_detections, boxes, scores, labels);
  }

 private:
  void collect_candidates(int32_t image) {
    const int32_t A = shape_.anchors, C = shape_.classes;
    const float threshold = params_.score_threshold;
    for (auto& list : per_class_) list.clear();
    float* act = activations_.data();
    for (int32_t a = 0; a < A; ++a) {
      logits_.row((static_cast<size_t>(image) * A + a) * C, C, act);
      if (params_.softmax) {
        if (!softmax_in_place(act, C)) continue;
      } else {
        for (int32_t c = 0; c < C; ++c) act[c] = 1.f / (1.f + std::exp(-act[c]));
      }
      for (int32_t c = 0; c < C; ++c) {
        if (c == params_.background_class) continue;
        if (act[c] > threshold) per_class_[c].push_back({act[c], c, a});
      }
    }
  }

  // Softmax over one anchor's logits; false when the row is NaN (NaN, +inf or all -inf logits),
  // which is what torch.softmax produces for such a row.
  static bool softmax_in_place(float* x, int32_t n) {
    float max_logit = -std::numeric_limits<float>::infinity();
    bool has_nan = false;
    for (int32_t i = 0; i < n; ++i) {
      has_nan |= (x[i] != x[i]);
      max_logit = x[i] > max_logit ? x[i] : max_logit;
    }
    if (has_nan || std::isinf(max_logit)) return false;
    float sum = 0.f;
    for (int32_t i = 0; i < n; ++i) {
      x[i] = std::exp(x[i] - max_logit);
      sum += x[i];
    }
    const float inv_sum = 1.f / sum;
    for (int32_t i = 0; i < n; ++i) x[i] *= inv_sum;
    return true;
  }

  void keep_top_k_per_class() {
    const size_t k = static_cast<size_t>(params_.pre_nms_top_k);
    for (auto& list : per_class_) {
      if (list.size() > k) {
        std::nth_element(list.begin(), list.begin() + (k - 1), list.end(), candidate_before);
        list.resize(k);
      }
      std::sort(list.begin(), list.end(), candidate_before);
    }
  }

  const Box& decoded_box(int32_t image, int32_t anchor) {
    if (!decoded_[anchor]) {
      const size_t base = (static_cast<size_t>(image) * shape_.anchors + anchor) * 4;
      boxes_[anchor] = decode_and_clip(deltas_.at(base), deltas_.at(base + 1), deltas_.at(base + 2),
                                       deltas_.at(base + 3), anchors_ + static_cast<size_t>(anchor) * 4,
                                       params_.box_weights, static_cast<float>(params_.image_width),
                                       static_cast<float>(params_.image_height));
      decoded_[anchor] = 1;
    }
    return boxes_[anchor];
  }

  // Greedy NMS over candidates sorted best first; appends survivors to kept_, at most
  // max_detections of them (the rest could never make the final top-K).
  void greedy_nms(int32_t image, const std::vector<Candidate>& sorted) {
    const size_t n = sorted.size();
    columns_.resize(n);
    suppressed_.assign(n, 0);
    for (size_t i = 0; i < n; ++i) {
      const Box& b = decoded_box(image, sorted[i].anchor);
      columns_.x1[i] = b.x1;
      columns_.y1[i] = b.y1;
      columns_.x2[i] = b.x2;
      columns_.y2[i] = b.y2;
      columns_.area[i] = box_area(b);
    }
    int32_t kept = 0;
    for (size_t i = 0; i < n && kept < params_.max_detections; ++i) {
      if (suppressed_[i]) continue;
      kept_.push_back({sorted[i], Box{columns_.x1[i], columns_.y1[i], columns_.x2[i], columns_.y2[i]}});
      ++kept;
      suppress_row(columns_.x1.data(), columns_.y1.data(), columns_.x2.data(), columns_.y2.data(),
                   columns_.area.data(), i, i + 1, n, params_.iou_threshold, suppressed_.data());
    }
  }

  void write_outputs(int32_t image, int32_t* num_detections, float* boxes, float* scores, int32_t* labels) {
    const size_t K = static_cast<size_t>(params_.max_detections);
    auto before = [](const Detection& a, const Detection& b) { return candidate_before(a.candidate, b.candidate); };
    const size_t n = std::min(K, kept_.size());
    std::partial_sort(kept_.begin(), kept_.begin() + n, kept_.end(), before);
    num_detections[image] = static_cast<int32_t>(n);
    float* out_boxes = boxes + static_cast<size_t>(image) * K * 4;
    float* out_scores = scores + static_cast<size_t>(image) * K;
    int32_t* out_labels = labels + static_cast<size_t>(image) * K;
    for (size_t i = 0; i < K; ++i) {
      if (i < n) {
        const Detection& d = kept_[i];
        out_boxes[i * 4 + 0] = d.box.x1;
        out_boxes[i * 4 + 1] = d.box.y1;
        out_boxes[i * 4 + 2] = d.box.x2;
        out_boxes[i * 4 + 3] = d.box.y2;
        out_scores[i] = d.candidate.score;
        out_labels[i] = d.candidate.cls;
      } else {
        out_boxes[i * 4 + 0] = out_boxes[i * 4 + 1] = out_boxes[i * 4 + 2] = out_boxes[i * 4 + 3] = 0.f;
        out_scores[i] = 0.f;
        out_labels[i] = -1;
      }
    }
  }

  Shape shape_;
  Params params_;
  InputReader deltas_, logits_;
  const float* anchors_;
  std::vector<float> activations_;
  std::vector<std::vector<Candidate>> per_class_;
  std::vector<Box> boxes_;
  std::vector<uint8_t> decoded_;
  std::vector<Candidate> merged_;
  std::vector<Detection> kept_;
  BoxColumns columns_;
  std::vector<uint8_t> suppressed_;
};

int32_t worker_count(int32_t batch) {
  int32_t n = static_cast<int32_t>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("SSDOPT_NMS_THREADS")) {
    const int32_t requested = std::atoi(env);
    if (requested > 0) n = requested;
  }
  return std::max(1, std::min(n, batch));
}

}  // namespace

void decode_nms_cpu(DType dtype, const void* box_deltas, const void* class_logits, const float* anchors,
                    const Shape& shape, const Params& params, int32_t* num_detections, float* boxes,
                    float* scores, int32_t* labels) {
  if (const char* problem = validate(shape, params)) throw std::invalid_argument(problem);
  if (shape.batch == 0) return;
  const float* table = dtype == DType::kFloat16 ? half_to_float_table() : nullptr;
  const InputReader deltas{dtype, box_deltas, table};
  const InputReader logits{dtype, class_logits, table};
  const int32_t workers = worker_count(shape.batch);

  auto work = [&](int32_t first, std::exception_ptr* error) {
    try {
      ImageWorker worker(shape, params, deltas, logits, anchors);
      for (int32_t b = first; b < shape.batch; b += workers) worker.run(b, num_detections, boxes, scores, labels);
    } catch (...) {
      *error = std::current_exception();
    }
  };
  std::vector<std::exception_ptr> errors(workers);
  std::vector<std::thread> threads;
  for (int32_t t = 1; t < workers; ++t) threads.emplace_back(work, t, &errors[t]);
  work(0, &errors[0]);
  for (auto& thread : threads) thread.join();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

}  // namespace nms
}  // namespace ssdopt
