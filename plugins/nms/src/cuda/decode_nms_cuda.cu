// SSDDecodeNMS on the GPU (ssdopt_nms.h: decode_nms_cuda, decode_nms_cuda_workspace_size).
//
// Asynchronous kernels on one stream: no host synchronisation and no allocation, so a call can be
// captured in a CUDA graph; all buffers live in a caller-provided workspace whose size depends only on
// (shape, params). Candidates are 64-bit keys, unique within an image: score bits above the inverted
// (class, anchor), so "key descending" is "score descending, then class and anchor ascending" -- the
// CPU kernel's order -- and the (class, anchor) is recovered from the key.
//   1. score_kernel      one block per 32 anchors (lane = anchor) x 4 warps sharing the classes:
//                        softmax/sigmoid (logits staged in shared memory; the softmax sum is one
//                        sequential pass in class order), threshold, compaction into per-(image, class)
//                        lists. Each class's ballot is kept in shared memory; then one thread per class
//                        issues that class's atomicAdd (all classes in flight at once) and the warps
//                        write. Also records each class's range of score bits (atomicMax), which lets
//                        the radix select below start at the first bit where a class's keys differ.
// Fast path (class-wise, pre_nms_top_k <= 512, max_detections <= 1024), two more kernels:
//   2. class_kernel      one block per (image, class), 1024 threads when B * C <= 512, else 256: the
//                        class's best p keys (radix select over the candidate list, 8-bit digits with a
//                        block scan; then a counting sort when <= 256 keys remain, else cub's block radix
//                        sort), decode, greedy NMS in 64-candidate chunks (IoU bitmask of the chunk's rows
//                        still open, one lane resolving, the chunk's kept boxes suppressing later
//                        candidates with one warp per kept box), at most max_detections kept, appended
//                        to the image's list. p = min(count, pre_nms_top_k, quota), quota = max(64,
//                        2560 / object classes): a class may stop short of its top-k; it then records
//                        its last processed key. The last block of an image to finish (fence + counter)
//                        selects the best K kept keys and checks the quota: every class that stopped
//                        short must have stopped at or below the K-th kept key (greedy NMS of a prefix is
//                        the prefix of the full NMS, so nothing it skipped can reach the output); fewer
//                        than K kept counts as failed. If no class failed it writes the outputs. The
//                        final selection starts at the first bit where the image's scores differ.
//   3. redo_kernel       only for images whose check failed (otherwise every block exits at once): one
//                        block per failing class, as wide as class_kernel's, the class in full but only
//                        its candidates above the check's K-th kept key (nothing below it can reach the
//                        output), adding its further kept keys; the image's last block selects again and
//                        writes the outputs. Sorts run on the bits where a list's keys differ only.
// General path (class-agnostic, larger top-k or K):
//   2. segmented top-k   tile_sort_kernel: cub::BlockRadixSort of each 2048-key tile of a segment, on the
//                        key bits in use only; tile_merge_kernel (segments longer than a tile): a key's
//                        rank = its position in its tile + the larger keys of the other tiles, counted by
//                        one binary search per tile, a warp's lanes sharing the tiles; rank < k is kept.
//                        Used for the per-(image, class) pre_nms_top_k, for the class-agnostic merge
//                        of all classes, and for the final top-K over the kept detections.
//   3. nms_kernel        one block per (image, class) segment (per image when class-agnostic): decode
//                        only the survivors (into shared memory), greedy NMS in 64-candidate chunks --
//                        a 64x64 IoU bitmask resolved by one lane, then the chunk's kept boxes suppress
//                        later candidates in parallel -- stopping at max_detections kept.
//   4. output_kernel     decode the K winners, pad the rest, write num_detections.
// SSDOPT_NMS_CUDA_PATH=general forces the general path; SSDOPT_NMS_CUDA_QUOTA=<n> sets the quota (tests).
// Box arithmetic is box_math.h, shared with the CPU kernel; compile with --fmad=false.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "../common/box_math.h"
#include "ssdopt_nms.h"

namespace ssdopt {
namespace nms {
namespace {

constexpr int kSortThreads = 256;
constexpr int kNmsThreads = 256;
constexpr int kNmsChunk = 64;
constexpr int kNmsSmemBoxes = 1024;  // segments up to this many candidates keep boxes in shared memory
constexpr int kScoreMaxSmemBytes = 48 * 1024;
constexpr int kScoreClassChunk = 128;  // classes whose ballots a score block aggregates at once
constexpr int kScoreAnchors = 32;      // anchors per score block: one per lane
constexpr int kScoreGroups = 4;        // warps per score block; warp g handles the classes c = g (mod 4)
constexpr size_t kAlign = 256;
// Fast path (class_kernel + final_kernel).
constexpr int kFastMaxTopK = 512;          // pre_nms_top_k (per class) it handles
constexpr int kFastMaxDetections = 1024;   // max_detections it handles
constexpr int kFastSortCap = 1024;         // keys a block sorts in shared memory (>= both of the above)
constexpr int kQuotaTotal = 2560;          // candidates per image processed before the exactness check
constexpr int kMinQuota = 64;
constexpr int kFastWideSegments = 512;     // B * C up to this: 1024-thread blocks

__host__ __device__ inline int bits_for(int64_t n) {  // bits to hold values 0..n-1 (at least 1)
  int bits = 1;
  while ((int64_t{1} << bits) < n) ++bits;
  return bits;
}

// SSDOPT_NMS_CUDA_PATH=general: always the general path (read once).
bool fast_path_allowed() {
  static const bool allowed = [] {
    const char* value = std::getenv("SSDOPT_NMS_CUDA_PATH");
    return value == nullptr || std::strcmp(value, "general") != 0;
  }();
  return allowed;
}

// SSDOPT_NMS_CUDA_QUOTA=<n> overrides the per-class quota of the fast path (read on every call, so a
// test can force the exactness check to fail and the final kernel to redo classes).
int quota_override() {
  const char* value = std::getenv("SSDOPT_NMS_CUDA_QUOTA");
  if (value == nullptr || value[0] == '\0') return 0;
  const long q = std::strtol(value, nullptr, 10);
  return q > 0 ? static_cast<int>(std::min<long>(q, 1 << 30)) : 0;
}

size_t score_smem_bytes(bool staged, int C) {  // dynamic: staged logits + per-class ballot, range, base
  const int chunk = std::min(C, kScoreClassChunk);
  return (staged ? static_cast<size_t>(kScoreAnchors) * C * sizeof(float) : 0) + static_cast<size_t>(chunk) * 16;
}

// Geometry of keys and buffers, computed identically by the workspace query and the launch.
struct Plan {
  int B, A, C;
  int top_k;             // min(pre_nms_top_k, A): candidates per (image, class)
  int nms_capacity;      // candidates per NMS segment: top_k, or C * top_k when class-agnostic
  int kept_capacity;     // kept detections per image: segments * min(nms_capacity, max_detections)
  int anchor_bits, class_bits, score_bits;
  uint32_t score_base;
  bool staged_scores;    // false: the score kernel reads logits straight from global memory
  bool fast;             // class_kernel + final_kernel
  int quota;             // fast path: candidates per class processed before the exactness check
  size_t off_counts, off_merged_counts, off_kept_counts, off_candidates, off_topk, off_gathered, off_merged;
  size_t off_kept, off_final, off_nms_boxes, off_nms_areas, off_nms_flags, off_nms_kept, off_last, total;
  size_t off_score_max, off_score_min_inv, off_done, off_done_redo, off_fail_list, off_fail_count, off_kth;
};

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

Plan make_plan(const Shape& shape, const Params& params) {
  Plan p{};
  p.B = shape.batch;
  p.A = shape.anchors;
  p.C = shape.classes;
  p.top_k = static_cast<int>(std::min<int64_t>(params.pre_nms_top_k, p.A));
  p.nms_capacity = params.class_agnostic ? p.C * p.top_k : p.top_k;
  const int segments_per_image = params.class_agnostic ? 1 : p.C;
  p.kept_capacity = segments_per_image * std::min(p.nms_capacity, params.max_detections);
  p.anchor_bits = bits_for(p.A);
  p.class_bits = bits_for(p.C);
  // Scores lie in (threshold, 1]: 1.0f has bits 0x3F800000.
  constexpr uint32_t kOneBits = 0x3F800000u;
  uint32_t threshold_bits = 0;
  std::memcpy(&threshold_bits, &params.score_threshold, sizeof(threshold_bits));
  p.score_base = params.score_threshold > 0.f ? std::min(threshold_bits, kOneBits) : 0u;
  p.score_bits = bits_for(static_cast<int64_t>(kOneBits - p.score_base) + 1);
  p.staged_scores = score_smem_bytes(true, p.C) + 2048 <= kScoreMaxSmemBytes;  // + the static arrays
  p.fast = fast_path_allowed() && !params.class_agnostic && p.top_k <= kFastMaxTopK &&
           params.max_detections <= kFastMaxDetections;
  const int object_classes = std::max(1, p.C - (params.background_class >= 0 ? 1 : 0));
  // quota = max(64, 2560 / object classes): 256 for C = 11 (ssdlite-shapes), 64 for C = 91.
  p.quota = std::max(kMinQuota, ceil_div(kQuotaTotal, object_classes));
  if (const int q = quota_override()) p.quota = q;
  const size_t B = p.B, segments = B * p.C;
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset = align_up(offset + bytes);
    return at;
  };
  // The counter arrays come first and are cleared by one memset (everything before off_candidates).
  p.off_counts = take(segments * sizeof(int));
  p.off_merged_counts = take(B * sizeof(int));
  p.off_kept_counts = take(B * sizeof(int));
  p.off_score_max = take(segments * sizeof(unsigned));
  p.off_score_min_inv = take(segments * sizeof(unsigned));
  p.off_done = take(B * sizeof(int));
  p.off_done_redo = take(B * sizeof(int));
  p.off_candidates = take(segments * p.A * sizeof(uint64_t));
  p.off_topk = take(p.fast ? 0 : segments * p.top_k * sizeof(uint64_t));
  const size_t merged = params.class_agnostic ? B * p.nms_capacity * sizeof(uint64_t) : 0;
  p.off_gathered = take(merged);
  p.off_merged = take(merged);
  p.off_kept = take(B * p.kept_capacity * sizeof(uint64_t));
  p.off_final = take(p.fast ? 0 : B * params.max_detections * sizeof(uint64_t));
  const size_t nms_scratch =
      !p.fast && p.nms_capacity > kNmsSmemBoxes ? B * segments_per_image * p.nms_capacity : 0;
  p.off_nms_boxes = take(nms_scratch * sizeof(Box));
  p.off_nms_areas = take(nms_scratch * sizeof(float));
  p.off_nms_flags = take(nms_scratch * sizeof(unsigned int));
  p.off_nms_kept = take(nms_scratch * sizeof(int));
  p.off_last = take(p.fast ? segments * sizeof(uint64_t) : 0);
  p.off_fail_list = take(p.fast ? segments * sizeof(int) : 0);
  p.off_fail_count = take(p.fast ? B * sizeof(int) : 0);
  p.off_kth = take(p.fast ? B * sizeof(uint64_t) : 0);
  p.total = offset;
  return p;
}

// ---- keys ---------------------------------------------------------------------------------------
// Scores above a threshold t > 0 have float bits above bits(t) (positive floats order like their bits),
// so keys store bits(score) - base, base = bits(t) (0 when t <= 0): fewer bits, fewer radix passes.
// class key: (score bits - base) << anchor_bits | (anchor_mask - anchor)
// image key: (score bits - base) << (class_bits + anchor_bits) | (class_mask - class) << anchor_bits | (anchor_mask - anchor)
struct KeyCodec {
  int anchor_bits, class_bits;
  uint32_t score_base;
  __device__ uint64_t anchor_mask() const { return (uint64_t{1} << anchor_bits) - 1; }
  __device__ uint64_t class_mask() const { return (uint64_t{1} << class_bits) - 1; }
  __device__ uint64_t class_key(float score, int anchor) const {
    return (static_cast<uint64_t>(__float_as_uint(score) - score_base) << anchor_bits) | (anchor_mask() - anchor);
  }
  __device__ int class_key_anchor(uint64_t key) const { return static_cast<int>(anchor_mask() - (key & anchor_mask())); }
  __device__ uint64_t class_to_image_key(uint64_t class_key, int cls) const {
    const uint64_t score_part = class_key >> anchor_bits;
    return (score_part << (class_bits + anchor_bits)) | ((class_mask() - cls) << anchor_bits) |
           (class_key & anchor_mask());
  }
  // The smallest class key of class `cls` whose image key is above `image_key` (keys compare as
  // (score, class_mask - class, anchor_mask - anchor)).
  __device__ uint64_t class_min_above(uint64_t image_key, int cls) const {
    const uint64_t score_part = image_key >> (class_bits + anchor_bits);
    const uint64_t key_class = (image_key >> anchor_bits) & class_mask();  // class_mask - its class
    const uint64_t mine = class_mask() - static_cast<uint64_t>(cls);
    if (mine > key_class) return score_part << anchor_bits;                           // same score suffices
    if (mine == key_class) return ((score_part << anchor_bits) | (image_key & anchor_mask())) + 1;
    return (score_part + 1) << anchor_bits;                                          // a higher score needed
  }
  __device__ float image_key_score(uint64_t key) const {
    return __uint_as_float(static_cast<uint32_t>(key >> (class_bits + anchor_bits)) + score_base);
  }
  __device__ int image_key_class(uint64_t key) const {
    return static_cast<int>(class_mask() - ((key >> anchor_bits) & class_mask()));
  }
  __device__ int image_key_anchor(uint64_t key) const { return static_cast<int>(anchor_mask() - (key & anchor_mask())); }
};

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }

struct DecodeArgs {
  const float* anchors;
  float weights[4];
  float width, height;
};

template <typename T>
__device__ Box decode_anchor(const T* deltas, int image, int A, int anchor, const DecodeArgs& d) {
  const T* row = deltas + (static_cast<size_t>(image) * A + anchor) * 4;
  return decode_and_clip(to_float(row[0]), to_float(row[1]), to_float(row[2]), to_float(row[3]),
                         d.anchors + static_cast<size_t>(anchor) * 4, d.weights, d.width, d.height);
}

// Number of keys strictly greater than `key` in `sorted` (descending) of length n.
__device__ inline int count_greater(const uint64_t* sorted, int n, uint64_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (sorted[mid] > key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ---- 1. scores, threshold, compaction ------------------------------------------------------------
struct ScoreArgs {
  int A, C, background_class;
  bool softmax;
  float threshold;
  KeyCodec codec;
  uint64_t* candidates;  // [B, C, A]
  int* counts;           // [B, C]
  unsigned* score_max;   // [B, C] largest (score bits - base) of a class's candidates (0 before)
  unsigned* score_min_inv;  // [B, C] ~smallest (0 before)
};

__device__ __forceinline__ unsigned warp_max(unsigned v) {  // all 32 lanes
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
#endif
}

constexpr int kStageUnroll = 8;  // global loads a thread has in flight while staging logits

// One block per 32 anchors (lane = anchor) and image; its 4 warps share the classes, so a thread walks
// C / 4 of them. The softmax sum stays one sequential pass in class order (warp 0), so every score is
// bit-identical to a single thread's computation.
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kScoreAnchors * kScoreGroups) score_kernel(const T* __restrict__ logits,
                                                                            ScoreArgs args) {
  extern __shared__ float smem[];
  __shared__ float part_max[kScoreGroups][kScoreAnchors], inv_sums[kScoreAnchors];
  __shared__ int part_nan[kScoreGroups][kScoreAnchors], valids[kScoreAnchors];
  const int image = blockIdx.y;
  const int first = blockIdx.x * kScoreAnchors;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int anchor = first + lane;
  const int C = args.C;
  const bool active = anchor < args.A;
  const T* block_logits = logits + (static_cast<size_t>(image) * args.A + first) * C;
  float* staged = smem;  // [32][C] when kStaged
  // After the staged rows: per-class ballot, score range and base offset of the current chunk.
  const int chunk = min(C, kScoreClassChunk);
  unsigned* ballots = reinterpret_cast<unsigned*>(smem + (kStaged ? kScoreAnchors * C : 0));
  unsigned* class_hi = ballots + chunk;
  unsigned* class_lo_inv = class_hi + chunk;
  int* class_base = reinterpret_cast<int*>(class_lo_inv + chunk);
  if (kStaged) {  // coalesced copy of this block's rows, kStageUnroll loads in flight per thread
    const int total = min(kScoreAnchors, args.A - first) * C;
    const int step = blockDim.x;
    int i = threadIdx.x;
    for (; i + (kStageUnroll - 1) * step < total; i += kStageUnroll * step) {
      float v[kStageUnroll];
#pragma unroll
      for (int j = 0; j < kStageUnroll; ++j) v[j] = to_float(block_logits[i + j * step]);
#pragma unroll
      for (int j = 0; j < kStageUnroll; ++j) staged[i + j * step] = v[j];
    }
    for (; i < total; i += step) staged[i] = to_float(block_logits[i]);
    __syncthreads();
  }
  auto logit = [&](int c) -> float {
    if (kStaged) return staged[lane * C + c];
    return to_float(block_logits[static_cast<size_t>(lane) * C + c]);
  };
  // Softmax normaliser; an anchor with NaN, +inf or only -inf logits has NaN scores: no candidate.
  float max_logit = -INFINITY, inv_sum = 1.f;
  bool valid = active;
  if (args.softmax) {
    bool has_nan = false;
    if (active) {
      for (int c = warp; c < C; c += kScoreGroups) {
        const float x = logit(c);
        has_nan |= (x != x);
        max_logit = x > max_logit ? x : max_logit;
      }
    }
    part_max[warp][lane] = max_logit;
    part_nan[warp][lane] = has_nan;
    __syncthreads();
    for (int g = 0; g < kScoreGroups; ++g) {
      const float x = part_max[g][lane];
      max_logit = x > max_logit ? x : max_logit;
      has_nan |= part_nan[g][lane] != 0;
    }
    valid = active && !has_nan && !isinf(max_logit);
    if (kStaged && valid) {
      for (int c = warp; c < C; c += kScoreGroups) staged[lane * C + c] = expf(logit(c) - max_logit);
    }
    __syncthreads();
    if (warp == 0) {
      if (valid) {
        float sum = 0.f;
        for (int c = 0; c < C; ++c) sum += kStaged ? staged[lane * C + c] : expf(logit(c) - max_logit);
        inv_sums[lane] = 1.f / sum;
      }
      valids[lane] = valid;
    }
    __syncthreads();
    inv_sum = inv_sums[lane];
    valid = valids[lane] != 0;
  }
  auto score_of = [&](int c) -> float {  // the same arithmetic every time it is asked
    if (args.softmax) {
      const float e = kStaged ? staged[lane * C + c] : expf(logit(c) - max_logit);
      return e * inv_sum;
    }
    return 1.f / (1.f + expf(-logit(c)));
  };
  const unsigned lanes_below = (1u << lane) - 1u;
  const size_t seg0 = static_cast<size_t>(image) * C;
  for (int c0 = 0; c0 < C; c0 += chunk) {
    const int cn = min(chunk, C - c0);
    // (a) each class's ballot over the 32 anchors and the range of its passing score bits
    for (int i = warp; i < cn; i += kScoreGroups) {
      const int c = c0 + i;
      float score = 0.f;
      const bool pass = valid && c != args.background_class && (score = score_of(c)) > args.threshold;
      const unsigned ballot = __ballot_sync(0xffffffffu, pass);
      if (ballot != 0) {  // warp-uniform; lanes that did not pass contribute 0 to both maxima
        const unsigned part = pass ? __float_as_uint(score) - args.codec.score_base : 0u;
        const unsigned hi = warp_max(part), lo_inv = warp_max(pass ? ~part : 0u);
        if (lane == 0) {
          class_hi[i] = hi;
          class_lo_inv[i] = lo_inv;
        }
      }
      if (lane == 0) ballots[i] = ballot;
    }
    __syncthreads();
    // (b) one thread per class: one atomicAdd for the block's count (all classes in flight together)
    for (int i = threadIdx.x; i < cn; i += blockDim.x) {
      const int total = __popc(ballots[i]);
      class_base[i] = total > 0 ? atomicAdd(&args.counts[seg0 + c0 + i], total) : 0;
      if (total > 0) {
        atomicMax(&args.score_max[seg0 + c0 + i], class_hi[i]);
        atomicMax(&args.score_min_inv[seg0 + c0 + i], class_lo_inv[i]);
      }
    }
    __syncthreads();
    // (c) writes: slot = class base + earlier lanes
    for (int i = warp; i < cn; i += kScoreGroups) {
      const unsigned ballot = ballots[i];
      if (ballot & (1u << lane)) {
        const int c = c0 + i;
        args.candidates[(seg0 + c) * args.A + class_base[i] + __popc(ballot & lanes_below)] =
            args.codec.class_key(score_of(c), anchor);
      }
    }
    __syncthreads();  // before the next chunk overwrites ballots and bases
  }
}

// ---- 2. segmented top-k ---------------------------------------------------------------------------
// Segment s holds counts[s] keys at keys + s * stride. The best min(counts[s], k) of them, sorted
// descending, are written to out + s * k. A segment of up to kSingleTile keys is sorted by one block
// (with the smallest sorter that holds it); longer ones are sorted in kMergeTile tiles, then merged.
struct TopkArgs {
  uint64_t* keys;        // tiles of multi-tile segments are sorted in place
  size_t stride;
  const int* counts;
  int k, end_bit;
  uint64_t* out;
};

constexpr int kSingleTileItems = 16;
constexpr int kMergeTileItems = 8;
constexpr int kSingleTile = kSortThreads * kSingleTileItems;  // 4096
constexpr int kMergeTile = kSortThreads * kMergeTileItems;    // 2048

template <int kItems>
using BlockSort = cub::BlockRadixSort<uint64_t, kSortThreads, kItems>;

__host__ __device__ constexpr size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

template <int kItems>
__host__ __device__ constexpr size_t sorter_storage_bytes() {  // TempStorage of every sorter from kItems down to kItems / 8
  return max_size(max_size(sizeof(typename BlockSort<kItems>::TempStorage),
                           sizeof(typename BlockSort<kItems / 2>::TempStorage)),
                  max_size(sizeof(typename BlockSort<kItems / 4>::TempStorage),
                           sizeof(typename BlockSort<kItems / 8>::TempStorage)));
}

// Sorts in[0, n) (n <= 256 * kItems) descending on bits [0, end_bit) and writes the first `limit` to out
// (out may equal in: every load happens before the sort's first barrier).
template <int kItems>
__device__ void sort_tile(const uint64_t* in, int n, uint64_t* out, int limit, int end_bit, void* storage) {
  auto& temp = *reinterpret_cast<typename BlockSort<kItems>::TempStorage*>(storage);
  uint64_t keys[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int idx = threadIdx.x * kItems + i;
    keys[i] = idx < n ? in[idx] : 0;
  }
  BlockSort<kItems>(temp).SortDescending(keys, 0, end_bit);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int idx = threadIdx.x * kItems + i;
    if (idx < limit) out[idx] = keys[i];
  }
}

template <int kItems>
__global__ void __launch_bounds__(kSortThreads) tile_sort_kernel(TopkArgs args) {
  constexpr int kTileSize = kSortThreads * kItems;
  __shared__ __align__(16) unsigned char storage[sorter_storage_bytes<kItems>()];
  const int segment = blockIdx.x;
  const int n = args.counts[segment];
  const int tile_start = blockIdx.y * kTileSize;
  if (tile_start >= n) return;
  const int tile_n = min(kTileSize, n - tile_start);
  uint64_t* in = args.keys + segment * args.stride + tile_start;
  const bool single_tile = n <= kTileSize;
  uint64_t* out = single_tile ? args.out + static_cast<size_t>(segment) * args.k : in;
  const int limit = single_tile ? min(tile_n, args.k) : tile_n;
  if (tile_n <= kTileSize / 8) sort_tile<kItems / 8>(in, tile_n, out, limit, args.end_bit, storage);
  else if (tile_n <= kTileSize / 4) sort_tile<kItems / 4>(in, tile_n, out, limit, args.end_bit, storage);
  else if (tile_n <= kTileSize / 2) sort_tile<kItems / 2>(in, tile_n, out, limit, args.end_bit, storage);
  else sort_tile<kItems>(in, tile_n, out, limit, args.end_bit, storage);
}

constexpr int kMergeWarps = 8;

// One warp per key; lanes share the other tiles. Only a tile's first min(k, tile) keys can rank < k,
// and counting within those suffices: a saturated count already puts the key out of the top k.
__global__ void __launch_bounds__(kMergeWarps * 32) tile_merge_kernel(TopkArgs args) {
  const int segment = blockIdx.x;
  const int n = args.counts[segment];
  if (n <= kMergeTile) return;
  const int tiles = (n + kMergeTile - 1) / kMergeTile;
  const int per_tile = min(args.k, kMergeTile);
  const uint64_t* sorted = args.keys + segment * args.stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int item = blockIdx.y * kMergeWarps + warp; item < tiles * per_tile; item += gridDim.y * kMergeWarps) {
    const int tile = item / per_tile, pos = item - tile * per_tile;
    if (pos >= min(kMergeTile, n - tile * kMergeTile)) continue;
    const uint64_t key = sorted[tile * kMergeTile + pos];
    int greater = 0;
    for (int other = lane; other < tiles; other += 32) {
      if (other != tile) {
        greater += count_greater(sorted + other * kMergeTile, min(per_tile, n - other * kMergeTile), key);
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) greater += __shfl_down_sync(0xffffffffu, greater, offset);
    const int rank = pos + greater;
    if (lane == 0 && rank < args.k) args.out[static_cast<size_t>(segment) * args.k + rank] = key;
  }
}

// Radix select: the k <= kSelectCap largest keys of a segment, found with 8-bit histograms from the top
// bits down (only the keys of the current boundary bucket are counted), then sorted with a small block
// sort. Keys are unique, so the refinement ends at the latest when every bit is decided.
constexpr int kSelectCap = kSortThreads * 4;  // 1024

__host__ __device__ constexpr size_t select_sorter_bytes() {
  return max_size(sizeof(typename BlockSort<4>::TempStorage),
                  max_size(sizeof(typename BlockSort<2>::TempStorage), sizeof(typename BlockSort<1>::TempStorage)));
}

__global__ void __launch_bounds__(kSortThreads) select_top_k_kernel(TopkArgs args) {
  __shared__ int hist[256];
  __shared__ uint64_t selected_keys[kSelectCap];
  __shared__ int scan_digit, scan_greater, scan_selected, selected_n;
  __shared__ __align__(16) unsigned char storage[select_sorter_bytes()];
  const int segment = blockIdx.x;
  const int n = args.counts[segment];
  if (n == 0) return;
  const uint64_t* in = args.keys + segment * args.stride;
  const int k = min(args.k, n);
  const int capacity = k <= kSortThreads ? kSortThreads : (k <= 2 * kSortThreads ? 2 * kSortThreads : kSelectCap);
  int shift = args.end_bit;  // bits at and above `shift` are decided
  uint64_t prefix = 0;       // key >> shift of the boundary bucket
  int greater = 0;           // keys above the boundary bucket
  int selected = n;          // keys with key >> shift >= prefix (always >= k)
  while (selected > capacity && shift > 0) {
    const int next_shift = max(shift - 8, 0);
    const int digits = 1 << (shift - next_shift);
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t key = in[i];
      if ((key >> shift) == prefix) atomicAdd(&hist[(key >> next_shift) & (digits - 1)], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int cum = greater, d = digits - 1;
      for (; d > 0 && cum + hist[d] < k; --d) cum += hist[d];
      scan_digit = d;
      scan_greater = cum;
      scan_selected = cum + hist[d];
    }
    __syncthreads();
    prefix = (prefix << (shift - next_shift)) | static_cast<uint64_t>(scan_digit);
    greater = scan_greater;
    selected = scan_selected;
    shift = next_shift;
  }
  if (threadIdx.x == 0) selected_n = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint64_t key = in[i];
    if ((key >> shift) >= prefix) selected_keys[atomicAdd(&selected_n, 1)] = key;
  }
  __syncthreads();
  const int count = selected_n;
  uint64_t* out = args.out + static_cast<size_t>(segment) * args.k;
  if (count <= kSortThreads) sort_tile<1>(selected_keys, count, out, k, args.end_bit, storage);
  else if (count <= 2 * kSortThreads) sort_tile<2>(selected_keys, count, out, k, args.end_bit, storage);
  else sort_tile<4>(selected_keys, count, out, k, args.end_bit, storage);
}

// SSDOPT_NMS_CUDA_SELECT=0 turns the radix-select path off (full tile sorts instead), for comparison.
bool select_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("SSDOPT_NMS_CUDA_SELECT");
    return value == nullptr || value[0] != '0';
  }();
  return enabled;
}

// Launches the kernels for `segments` segments of at most `capacity` keys each.
void segmented_top_k(const TopkArgs& args, int segments, int capacity, cudaStream_t stream) {
  if (segments == 0 || capacity == 0) return;
  if (args.k <= kSelectCap && args.k < capacity && select_enabled()) {
    select_top_k_kernel<<<segments, kSortThreads, 0, stream>>>(args);
    return;
  }
  if (capacity <= kSingleTile) {
    tile_sort_kernel<kSingleTileItems><<<dim3(segments, 1), kSortThreads, 0, stream>>>(args);
    return;
  }
  tile_sort_kernel<kMergeTileItems><<<dim3(segments, ceil_div(capacity, kMergeTile)), kSortThreads, 0, stream>>>(args);
  // One key per warp while the grid stays moderate; more keys per warp for huge batches.
  const int64_t items = static_cast<int64_t>(ceil_div(capacity, kMergeTile)) * std::min(args.k, kMergeTile);
  const int64_t per_warp = std::min<int64_t>(64, std::max<int64_t>(1, segments * items / (kMergeWarps * 16384)));
  const int blocks = ceil_div(items, kMergeWarps * per_warp);
  tile_merge_kernel<<<dim3(segments, blocks), kMergeWarps * 32, 0, stream>>>(args);
}

// Class-agnostic: each class's top-k, as image keys, appended to one list per image.
struct GatherArgs {
  int C, top_k, background_class, capacity;
  KeyCodec codec;
  const int* counts;
  const uint64_t* topk;  // [B, C, top_k] class keys
  uint64_t* gathered;    // [B, capacity] image keys
  int* gathered_counts;  // [B]
};

__global__ void gather_classes_kernel(GatherArgs args) {
  __shared__ int base;
  const int image = blockIdx.y, cls = blockIdx.x;
  const size_t seg = static_cast<size_t>(image) * args.C + cls;
  const int n = cls == args.background_class ? 0 : min(args.counts[seg], args.top_k);
  if (n == 0) return;
  if (threadIdx.x == 0) base = atomicAdd(&args.gathered_counts[image], n);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    args.gathered[static_cast<size_t>(image) * args.capacity + base + i] =
        args.codec.class_to_image_key(args.topk[seg * args.top_k + i], cls);
  }
}

// ---- 3. NMS -----------------------------------------------------------------------------------------
struct NmsArgs {
  int A, C, top_k, max_detections, background_class, nms_capacity, kept_capacity;
  bool agnostic;
  float iou_threshold;
  KeyCodec codec;
  DecodeArgs decode;
  const int* counts;          // [B, C] candidates per class (before top-k)
  const uint64_t* topk;       // class keys [B, C, top_k]
  const int* merged_counts;   // [B] (agnostic)
  const uint64_t* merged;     // image keys [B, C * top_k] (agnostic)
  Box* scratch_boxes;         // [B, S, nms_capacity] when nms_capacity > kNmsSmemBoxes
  float* scratch_areas;
  unsigned int* scratch_flags;
  int* scratch_kept;
  uint64_t* kept;             // image keys [B, kept_capacity], appended
  int* kept_counts;           // [B]
};

template <typename T>
__global__ void __launch_bounds__(kNmsThreads) nms_kernel(const T* __restrict__ deltas, NmsArgs args) {
  __shared__ Box smem_boxes[kNmsSmemBoxes];
  __shared__ float smem_areas[kNmsSmemBoxes];
  __shared__ unsigned int smem_flags[kNmsSmemBoxes];
  __shared__ int smem_kept[kNmsSmemBoxes];
  __shared__ uint64_t row_mask[kNmsChunk];
  __shared__ int total_kept, out_base;

  const int image = blockIdx.y, segment = blockIdx.x;
  const int cls = segment;  // unused when agnostic
  if (!args.agnostic && cls == args.background_class) return;
  const size_t class_seg = static_cast<size_t>(image) * args.C + cls;
  const int n = args.agnostic ? args.merged_counts[image] : min(args.counts[class_seg], args.top_k);
  if (n == 0) return;
  const uint64_t* keys = args.agnostic ? args.merged + static_cast<size_t>(image) * args.nms_capacity
                                       : args.topk + class_seg * args.top_k;
  Box* boxes = smem_boxes;
  float* areas = smem_areas;
  unsigned int* flags = smem_flags;
  int* kept_list = smem_kept;  // candidate indices kept so far, in order
  if (args.nms_capacity > kNmsSmemBoxes) {
    const size_t nms_seg = static_cast<size_t>(image) * gridDim.x + segment;
    boxes = args.scratch_boxes + nms_seg * args.nms_capacity;
    areas = args.scratch_areas + nms_seg * args.nms_capacity;
    flags = args.scratch_flags + nms_seg * args.nms_capacity;
    kept_list = args.scratch_kept + nms_seg * args.nms_capacity;
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int anchor = args.agnostic ? args.codec.image_key_anchor(keys[i]) : args.codec.class_key_anchor(keys[i]);
    boxes[i] = decode_anchor(deltas, image, args.A, anchor, args.decode);
    areas[i] = box_area(boxes[i]);
    flags[i] = 0;
  }
  if (threadIdx.x == 0) total_kept = 0;
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float thr = args.iou_threshold;
  for (int start = 0; start < n; start += kNmsChunk) {
    const int len = min(kNmsChunk, n - start);
    const int kept_before = total_kept;  // read before (b) rewrites it
    // (a) IoU bitmask inside the chunk: row r, bit c set when c > r and IoU(r, c) > thr.
    for (int r = warp; r < len; r += kNmsThreads / 32) {
      const Box br = boxes[start + r];
      const float ar = areas[start + r];
      const int c0 = lane, c1 = lane + 32;
      const bool hit0 = c0 > r && c0 < len && iou_above(br, ar, boxes[start + c0], areas[start + c0], thr);
      const bool hit1 = c1 > r && c1 < len && iou_above(br, ar, boxes[start + c1], areas[start + c1], thr);
      const unsigned lo = __ballot_sync(0xffffffffu, hit0);
      const unsigned hi = __ballot_sync(0xffffffffu, hit1);
      if (lane == 0) row_mask[r] = (static_cast<uint64_t>(hi) << 32) | lo;
    }
    __syncthreads();
    // (b) one lane resolves the chunk greedily, jumping from survivor to survivor.
    if (warp == 0) {
      const bool s0 = lane < len && flags[start + lane];
      const bool s1 = lane + 32 < len && flags[start + lane + 32];
      const unsigned lo = __ballot_sync(0xffffffffu, s0);
      const unsigned hi = __ballot_sync(0xffffffffu, s1);
      if (lane == 0) {
        uint64_t removed = (static_cast<uint64_t>(hi) << 32) | lo;
        const uint64_t valid = len == 64 ? ~uint64_t{0} : ((uint64_t{1} << len) - 1);
        int total = kept_before;
        uint64_t open = valid & ~removed;
        while (open != 0 && total < args.max_detections) {
          const int r = __ffsll(static_cast<long long>(open)) - 1;
          kept_list[total++] = start + r;
          removed |= row_mask[r] | (uint64_t{1} << r);
          open = valid & ~removed;
        }
        total_kept = total;
      }
    }
    __syncthreads();
    const int kept_after = total_kept;
    if (kept_after >= args.max_detections) break;
    // (c) the chunk's survivors suppress later candidates: (candidate, survivor) pairs spread over the
    // block; flags only ever go 0 -> 1, set atomically.
    const int first_later = start + len;
    const int survivors = kept_after - kept_before;
    const int pairs = (n - first_later) * survivors;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
      const int j = first_later + p / survivors;
      const int r = kept_list[kept_before + p % survivors];
      if (iou_above(boxes[r], areas[r], boxes[j], areas[j], thr)) atomicOr(&flags[j], 1u);
    }
    __syncthreads();
  }
  // Survivors, best first, appended to the image's kept list (image keys).
  const int total = total_kept;
  if (threadIdx.x == 0) out_base = atomicAdd(&args.kept_counts[image], total);
  __syncthreads();
  uint64_t* kept_out = args.kept + static_cast<size_t>(image) * args.kept_capacity + out_base;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const uint64_t key = keys[kept_list[i]];
    kept_out[i] = args.agnostic ? key : args.codec.class_to_image_key(key, cls);
  }
}

// ---- 4. outputs -----------------------------------------------------------------------------------
struct OutputArgs {
  int A, max_detections;
  KeyCodec codec;
  DecodeArgs decode;
  const uint64_t* final_keys;  // [B, K] sorted
  const int* kept_counts;      // [B]
  int32_t* num_detections;
  float* boxes;
  float* scores;
  int32_t* labels;
};

template <typename T>
__global__ void output_kernel(const T* __restrict__ deltas, OutputArgs args) {
  const int image = blockIdx.y;
  const int K = args.max_detections;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= K) return;
  const int num = min(args.kept_counts[image], K);
  if (i == 0) args.num_detections[image] = num;
  const size_t slot = static_cast<size_t>(image) * K + i;
  float4 box = make_float4(0.f, 0.f, 0.f, 0.f);
  float score = 0.f;
  int32_t label = -1;
  if (i < num) {
    const uint64_t key = args.final_keys[slot];
    const Box b = decode_anchor(deltas, image, args.A, args.codec.image_key_anchor(key), args.decode);
    box = make_float4(b.x1, b.y1, b.x2, b.y2);
    score = args.codec.image_key_score(key);
    label = args.codec.image_key_class(key);
  }
  reinterpret_cast<float4*>(args.boxes)[slot] = box;
  args.scores[slot] = score;
  args.labels[slot] = label;
}

// ---- fast path: class_kernel + redo_kernel ------------------------------------------------------
constexpr int kRankSortMax = 256;  // a selection this small is sorted by counting, not by radix passes

// 3-bit digits for 1024-thread blocks keep the sorter's counters (and the block) under 48 KB.
template <int kThreads, int kItems>
using FastSort = cub::BlockRadixSort<uint64_t, kThreads, kItems, cub::NullType, kThreads >= 1024 ? 3 : 4>;

template <int kThreads>
__host__ __device__ constexpr size_t fast_sort_bytes() {  // every cub sorter block_top_k may use
  constexpr int kMaxItems = kFastSortCap / kThreads;
  size_t bytes = sizeof(typename FastSort<kThreads, 1>::TempStorage);
  if constexpr (kMaxItems >= 2) bytes = max_size(bytes, sizeof(typename FastSort<kThreads, 2>::TempStorage));
  if constexpr (kMaxItems >= 4) bytes = max_size(bytes, sizeof(typename FastSort<kThreads, 4>::TempStorage));
  return bytes;
}

struct FastNmsSmem {
  Box boxes[kFastMaxTopK];
  float areas[kFastMaxTopK];
  uint64_t row_mask[kNmsChunk];
  int kept_list[kFastMaxTopK];
};

template <int kThreads>
struct FastShared {
  uint64_t keys[kFastSortCap];  // sorted keys (class keys, or image keys when finishing an image)
  union {
    __align__(16) unsigned char sort[fast_sort_bytes<kThreads>()];
    FastNmsSmem nms;
  } u;
  uint64_t removed[kFastMaxTopK / 64];  // NMS: candidate suppressed
  typename cub::BlockScan<int, kThreads>::TempStorage scan;
  int hist[256];
  int digit, greater, selected, count, total_kept, out_base, fails, is_last;
  unsigned range_hi, range_lo_inv;
};

struct FastArgs {
  int A, C, top_k, quota, max_detections, background_class, kept_capacity;
  int anchor_bits, class_end_bit, image_end_bit;
  float iou_threshold;
  KeyCodec codec;
  DecodeArgs decode;
  const int* counts;             // [B, C]
  const unsigned* score_max;     // [B, C] range of a class's (score bits - base), from score_kernel
  const unsigned* score_min_inv;
  const uint64_t* candidates;    // class keys [B, C, A]
  uint64_t* kept;                // image keys [B, kept_capacity], appended
  int* kept_counts;              // [B]
  uint64_t* last;                // [B, C]: 1 + image key of the last processed candidate of a class that
                                 // stopped short of min(count, top_k); 0 otherwise
  int* fail_list;                // [B, C]: classes the exactness check sends to redo_kernel
  int* fail_count;               // [B]
  uint64_t* kth;                 // [B]: 1 + the K-th kept image key at the check (0: fewer than K kept)
  int* done;                     // [B] class_kernel blocks finished (zeroed by the memset)
  int* done_redo;                // [B] redo_kernel blocks finished (zeroed by the memset)
  int32_t* num_detections;
  float* out_boxes;
  float* out_scores;
  int32_t* out_labels;
};

template <int kThreads, int kItems>
__device__ void fast_sort(uint64_t* keys, int n, int end_bit, void* storage) {
  auto& temp = *reinterpret_cast<typename FastSort<kThreads, kItems>::TempStorage*>(storage);
  uint64_t k[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int idx = threadIdx.x * kItems + i;
    k[i] = idx < n ? keys[idx] : 0;
  }
  FastSort<kThreads, kItems>(temp).SortDescending(k, 0, end_bit);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int idx = threadIdx.x * kItems + i;
    if (idx < n) keys[idx] = k[i];
  }
}

// Sorts keys[0, n), n <= kRankSortMax, unique, descending: a key's place is the number of larger keys,
// counted by kThreads / kRankSortMax consecutive lanes per key.
template <int kThreads>
__device__ void rank_sort(uint64_t* keys, int n) {
  constexpr int kSplit = kThreads / kRankSortMax;
  static_assert(kSplit >= 1 && kSplit <= 32 && (kSplit & (kSplit - 1)) == 0, "lanes per key");
  const int idx = threadIdx.x / kSplit, part = threadIdx.x % kSplit;
  const uint64_t key = idx < n ? keys[idx] : 0;
  int rank = 0;
  if (idx < n) {
    for (int j = part; j < n; j += kSplit) rank += keys[j] > key ? 1 : 0;
  }
#pragma unroll
  for (int o = kSplit / 2; o > 0; o >>= 1) rank += __shfl_xor_sync(0xffffffffu, rank, o);
  __syncthreads();
  if (idx < n && part == 0) keys[rank] = key;
  __syncthreads();
}

constexpr int kLoadBatch = 4;  // global loads a thread has in flight while scanning a key list

// batch[j] = keys[base + j * kThreads + threadIdx.x] (0 past n), issued together; through L2 only, since
// the list may have been written by other blocks of the same launch.
template <int kThreads>
__device__ __forceinline__ void load_batch(const uint64_t* keys, int n, int base, uint64_t (&batch)[kLoadBatch]) {
#pragma unroll
  for (int j = 0; j < kLoadBatch; ++j) {
    const int i = base + j * kThreads + threadIdx.x;
    batch[j] = i < n ? __ldcg(keys + i) : 0;
  }
}

// The min(m, k) largest of the m keys >= min_key among keys[0, n) (global memory, unique, all within
// [lo, hi]), sorted descending, into s.keys; returns that count. k <= kFastSortCap. Whole block; ends with a
// barrier. Radix select (of the k largest of all n) from the highest bit where lo and hi differ, 8 bits a
// pass, counting only the keys of the boundary bucket, until the keys at or above it fit (kRankSortMax when
// k does, else kFastSortCap); those that are also >= min_key are gathered and sorted, on the bits where lo
// and hi differ only. (Both sets are upper sets of the keys: their intersection is the smaller one, so it
// starts with the min(m, k) largest keys >= min_key.)
template <int kThreads>
__device__ int block_top_k(const uint64_t* keys, int n, int k, int end_bit, uint64_t hi, uint64_t lo,
                           FastShared<kThreads>& s, uint64_t min_key = 0) {
  k = min(k, n);
  if (k <= 0) return 0;
  const int lane = threadIdx.x & 31;
  const int cap = k <= kRankSortMax ? kRankSortMax : kFastSortCap;
  int shift = min(end_bit, 64 - __clzll(static_cast<long long>(hi ^ lo)));  // bits at and above are decided
  const int sort_bits = max(shift, 1);  // every key shares the bits above
  uint64_t prefix = shift >= 64 ? 0 : hi >> shift;  // key >> shift of the boundary bucket
  int greater = 0;   // keys above the boundary bucket
  int selected = n;  // keys with key >> shift >= prefix (always >= k)
  while (selected > cap && shift > 0) {
    const int next_shift = max(shift - 8, 0);
    const int digits = 1 << (shift - next_shift);
    if (threadIdx.x < 256) s.hist[threadIdx.x] = 0;
    __syncthreads();
    for (int base = 0; base < n; base += kLoadBatch * kThreads) {
      uint64_t batch[kLoadBatch];
      load_batch<kThreads>(keys, n, base, batch);
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int i = base + j * kThreads + threadIdx.x;
        const uint64_t key = batch[j];
        const bool in = i < n && (key >> shift) == prefix;
        const unsigned act = __ballot_sync(0xffffffffu, in);
        if (in) {
          const int d = static_cast<int>((key >> next_shift) & static_cast<uint64_t>(digits - 1));
          const int leader = __ffs(act) - 1;
          const int d0 = __shfl_sync(act, d, leader);
          if (__all_sync(act, d == d0)) {  // common when scores are close: one atomic for the warp
            if (lane == leader) atomicAdd(&s.hist[d], __popc(act));
          } else {
            atomicAdd(&s.hist[d], 1);
          }
        }
      }
    }
    __syncthreads();
    // Thread t < 256 holds digit 255 - t; its inclusive sum counts the bucket's keys at or above it.
    const int h = threadIdx.x < 256 ? s.hist[255 - threadIdx.x] : 0;
    int at_or_above = 0;
    cub::BlockScan<int, kThreads>(s.scan).InclusiveSum(h, at_or_above);
    if (threadIdx.x < 256 && greater + at_or_above >= k && greater + at_or_above - h < k) {
      s.digit = 255 - threadIdx.x;
      s.greater = greater + at_or_above - h;
      s.selected = greater + at_or_above;
    }
    __syncthreads();
    prefix = (prefix << (shift - next_shift)) | static_cast<uint64_t>(s.digit);
    greater = s.greater;
    selected = s.selected;
    shift = next_shift;
    __syncthreads();  // s.digit & co. are rewritten by the next pass
  }
  if (threadIdx.x == 0) s.count = 0;
  __syncthreads();
  for (int base = 0; base < n; base += kLoadBatch * kThreads) {
    uint64_t batch[kLoadBatch];
    load_batch<kThreads>(keys, n, base, batch);
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int i = base + j * kThreads + threadIdx.x;
      const uint64_t key = batch[j];
      const bool in = i < n && key >= min_key && (shift >= 64 ? true : (key >> shift) >= prefix);
      const unsigned act = __ballot_sync(0xffffffffu, in);
      int slot = 0;
      if (lane == 0 && act != 0) slot = atomicAdd(&s.count, __popc(act));
      slot = __shfl_sync(0xffffffffu, slot, 0);
      const int at = slot + __popc(act & ((1u << lane) - 1u));
      if (in && at < kFastSortCap) s.keys[at] = key;  // always true for unique keys
    }
  }
  __syncthreads();
  const int count = min(s.count, kFastSortCap);  // <= selected <= cap (== selected when min_key is 0)
  if (count <= kRankSortMax) {
    rank_sort<kThreads>(s.keys, count);
  } else if (count <= kThreads) {
    fast_sort<kThreads, 1>(s.keys, count, sort_bits, s.u.sort);
  } else if constexpr (kFastSortCap / kThreads >= 2) {
    if (count <= 2 * kThreads) fast_sort<kThreads, 2>(s.keys, count, sort_bits, s.u.sort);
    else fast_sort<kThreads, kFastSortCap / kThreads>(s.keys, count, sort_bits, s.u.sort);
  }
  __syncthreads();
  return min(k, count);
}

// Greedy NMS over the sorted class keys s.keys[0, p), p <= kFastMaxTopK, of `image`; keeps at most
// max_detections. Returns the kept count; s.u.nms.kept_list holds their positions.
template <typename T, int kThreads>
__device__ int class_nms(const T* deltas, int image, int p, const FastArgs& a, FastShared<kThreads>& s) {
  FastNmsSmem& m = s.u.nms;
  for (int i = threadIdx.x; i < p; i += kThreads) {
    const Box b = decode_anchor(deltas, image, a.A, a.codec.class_key_anchor(s.keys[i]), a.decode);
    m.boxes[i] = b;
    m.areas[i] = box_area(b);
  }
  if (threadIdx.x < kFastMaxTopK / 64) s.removed[threadIdx.x] = 0;
  if (threadIdx.x == 0) s.total_kept = 0;
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kWarps = kThreads / 32;
  const float thr = a.iou_threshold;
  for (int start = 0; start < p; start += kNmsChunk) {
    const int len = min(kNmsChunk, p - start);
    const int word = start / 64;
    const uint64_t removed_before = s.removed[word];  // stable: last written before the previous barrier
    const int kept_before = s.total_kept;
    // (a) IoU bitmask of the chunk's rows still open: row r, bit c set when c > r and IoU(r, c) > thr.
    for (int r = warp; r < len; r += kWarps) {
      if ((removed_before >> r) & 1u) continue;  // warp-uniform
      const Box br = m.boxes[start + r];
      const float ar = m.areas[start + r];
      const int c0 = lane, c1 = lane + 32;
      const bool hit0 = c0 > r && c0 < len && iou_above(br, ar, m.boxes[start + c0], m.areas[start + c0], thr);
      const bool hit1 = c1 > r && c1 < len && iou_above(br, ar, m.boxes[start + c1], m.areas[start + c1], thr);
      const unsigned lo = __ballot_sync(0xffffffffu, hit0);
      const unsigned hi = __ballot_sync(0xffffffffu, hit1);
      if (lane == 0) m.row_mask[r] = (static_cast<uint64_t>(hi) << 32) | lo;
    }
    __syncthreads();
    // (b) one lane resolves the chunk greedily, jumping from open candidate to open candidate.
    if (threadIdx.x == 0) {
      uint64_t removed = removed_before;
      const uint64_t valid = len == 64 ? ~uint64_t{0} : ((uint64_t{1} << len) - 1);
      int total = kept_before;
      uint64_t open = valid & ~removed;
      while (open != 0 && total < a.max_detections) {
        const int r = __ffsll(static_cast<long long>(open)) - 1;
        m.kept_list[total++] = start + r;
        removed |= m.row_mask[r] | (uint64_t{1} << r);
        open = valid & ~removed;
      }
      s.removed[word] = removed;
      s.total_kept = total;
    }
    __syncthreads();
    const int kept_after = s.total_kept;
    const int first_later = start + len;
    if (kept_after >= a.max_detections || first_later >= p) break;
    // (c) the chunk's kept boxes suppress later candidates: a warp per kept box, its lanes over 32
    // consecutive later candidates (first_later is a multiple of 64), one atomicOr per warp and word.
    for (int k = kept_before + warp; k < kept_after; k += kWarps) {
      const int r = m.kept_list[k];
      const Box br = m.boxes[r];
      const float ar = m.areas[r];
      for (int j0 = first_later; j0 < p; j0 += 32) {
        const int j = j0 + lane;
        const bool hit = j < p && iou_above(br, ar, m.boxes[j], m.areas[j], thr);
        const unsigned bits = __ballot_sync(0xffffffffu, hit);
        if (lane == 0 && bits != 0) {
          atomicOr(reinterpret_cast<unsigned long long*>(&s.removed[j0 >> 6]),
                   static_cast<unsigned long long>(bits) << (j0 & 63));
        }
      }
    }
    __syncthreads();
  }
  __syncthreads();
  return s.total_kept;
}

// Appends the kept class keys (positions s.u.nms.kept_list[0, kept) of s.keys) of class `cls` as image
// keys to `out`, skipping keys at or above `skip_from` (image keys; ~0 skips none); the slots come from one
// atomicAdd on *counter. Whole block.
template <int kThreads>
__device__ void append_kept(int kept, int cls, uint64_t skip_from, uint64_t* out, int* counter, const FastArgs& a,
                            FastShared<kThreads>& s) {
  const int lane = threadIdx.x & 31;
  if (threadIdx.x == 0) s.count = 0;
  __syncthreads();
  for (int base = 0; base < kept; base += kThreads) {
    const int i = base + threadIdx.x;
    const uint64_t key = i < kept ? a.codec.class_to_image_key(s.keys[s.u.nms.kept_list[i]], cls) : 0;
    const unsigned act = __ballot_sync(0xffffffffu, i < kept && key < skip_from);
    if (lane == 0 && act != 0) atomicAdd(&s.count, __popc(act));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    s.out_base = s.count > 0 ? atomicAdd(counter, s.count) : 0;
    s.count = 0;
  }
  __syncthreads();
  for (int base = 0; base < kept; base += kThreads) {
    const int i = base + threadIdx.x;
    const uint64_t key = i < kept ? a.codec.class_to_image_key(s.keys[s.u.nms.kept_list[i]], cls) : 0;
    const bool in = i < kept && key < skip_from;
    const unsigned act = __ballot_sync(0xffffffffu, in);
    int slot = 0;
    if (lane == 0 && act != 0) slot = atomicAdd(&s.count, __popc(act));
    slot = __shfl_sync(0xffffffffu, slot, 0);
    if (in) out[s.out_base + slot + __popc(act & ((1u << lane) - 1u))] = key;
  }
  __syncthreads();
}

// A class's candidates: select the best `want` of those >= min_key (class keys), NMS, append the kept ones
// below `skip_from`.
template <typename T, int kThreads>
__device__ int process_class(const T* deltas, int image, int cls, int want, uint64_t skip_from, uint64_t min_key,
                             const FastArgs& a, FastShared<kThreads>& s, uint64_t* last_key) {
  const size_t seg = static_cast<size_t>(image) * a.C + cls;
  const int n = a.counts[seg];
  const uint64_t anchor_mask = (uint64_t{1} << a.anchor_bits) - 1;
  const uint64_t hi = (static_cast<uint64_t>(a.score_max[seg]) << a.anchor_bits) | anchor_mask;
  const uint64_t lo = static_cast<uint64_t>(~a.score_min_inv[seg]) << a.anchor_bits;
  const int p = block_top_k<kThreads>(a.candidates + seg * a.A, n, want, a.class_end_bit, hi, lo, s, min_key);
  *last_key = p > 0 ? a.codec.class_to_image_key(s.keys[p - 1], cls) : 0;
  const int kept = class_nms<T, kThreads>(deltas, image, p, a, s);
  append_kept<kThreads>(kept, cls, skip_from, a.kept + static_cast<size_t>(image) * a.kept_capacity,
                        &a.kept_counts[image], a, s);
  return p;
}

// After every block of the launch for `image` finished (fence + counter): the best max_detections kept
// keys, sorted. With `check`: classes that stopped short at a key above the K-th kept key (or any class
// that stopped short, when fewer than K were kept) go to fail_list for redo_kernel, which then finishes
// the image; otherwise (and always without `check`) the outputs are written here.
// The image's kept keys lie within the range of its candidates' scores (score_kernel's per-class ranges),
// so the final selection starts at the first score bit where they differ.
template <typename T, int kThreads>
__device__ void finish_image(const T* deltas, int image, bool check, const FastArgs& a, FastShared<kThreads>& s) {
  const int K = a.max_detections;
  const size_t seg0 = static_cast<size_t>(image) * a.C;
  if (threadIdx.x == 0) {
    s.range_hi = 0;
    s.range_lo_inv = 0;
  }
  __syncthreads();
  unsigned range_hi = 0, range_lo_inv = 0;
  for (int c = threadIdx.x; c < a.C; c += kThreads) {  // empty classes hold 0 in both
    range_hi = max(range_hi, a.score_max[seg0 + c]);
    range_lo_inv = max(range_lo_inv, a.score_min_inv[seg0 + c]);
  }
  range_hi = warp_max(range_hi);
  range_lo_inv = warp_max(range_lo_inv);
  if ((threadIdx.x & 31) == 0 && range_lo_inv != 0) {
    atomicMax(&s.range_hi, range_hi);
    atomicMax(&s.range_lo_inv, range_lo_inv);
  }
  __syncthreads();
  const int low_bits = a.codec.class_bits + a.codec.anchor_bits;
  const uint64_t low_mask = (uint64_t{1} << low_bits) - 1;
  uint64_t hi = (uint64_t{1} << a.image_end_bit) - 1, lo = 0;
  if (s.range_lo_inv != 0) {  // some class has candidates (~(score bits - base) is never 0)
    hi = (static_cast<uint64_t>(s.range_hi) << low_bits) | low_mask;
    lo = static_cast<uint64_t>(~s.range_lo_inv) << low_bits;
  }
  const int total = __ldcg(&a.kept_counts[image]);
  const int num = block_top_k<kThreads>(a.kept + static_cast<size_t>(image) * a.kept_capacity, total, K,
                                        a.image_end_bit, hi, lo, s);
  if (check) {
    const bool have_kth = num == K;
    const uint64_t kth = have_kth ? s.keys[K - 1] : 0;
    if (threadIdx.x == 0) s.fails = 0;
    __syncthreads();
    for (int c = threadIdx.x; c < a.C; c += kThreads) {
      const uint64_t last = __ldcg(&a.last[seg0 + c]);
      if (last != 0 && (!have_kth || last - 1 > kth)) a.fail_list[seg0 + atomicAdd(&s.fails, 1)] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      a.fail_count[image] = s.fails;
      a.kth[image] = have_kth ? kth + 1 : 0;
    }
    if (s.fails > 0) return;  // block-uniform
  }
  for (int i = threadIdx.x; i < K; i += kThreads) {
    const size_t slot = static_cast<size_t>(image) * K + i;
    float4 box = make_float4(0.f, 0.f, 0.f, 0.f);
    float score = 0.f;
    int32_t label = -1;
    if (i < num) {
      const uint64_t key = s.keys[i];
      const Box b = decode_anchor(deltas, image, a.A, a.codec.image_key_anchor(key), a.decode);
      box = make_float4(b.x1, b.y1, b.x2, b.y2);
      score = a.codec.image_key_score(key);
      label = a.codec.image_key_class(key);
    }
    reinterpret_cast<float4*>(a.out_boxes)[slot] = box;
    a.out_scores[slot] = score;
    a.out_labels[slot] = label;
  }
  if (threadIdx.x == 0) a.num_detections[image] = num;
}

// True in every thread of the block that finished last among the `blocks` blocks of `image` that call this;
// the block's global writes are fenced before it counts, and the last block fences before it reads.
template <int kThreads>
__device__ bool last_block_of_image(int* done, int blocks, FastShared<kThreads>& s) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s.is_last = atomicAdd(done, 1) == blocks - 1;
  __syncthreads();
  const bool last = s.is_last;
  if (last) __threadfence();
  return last;
}

// One block per (class, image): the class's best min(count, top_k, quota) candidates, NMS, kept keys
// appended; the image's last block selects, checks the quota and (usually) writes the outputs. Its blocks
// mostly wait on memory: the 256-thread version keeps 6 blocks per SM (40 registers) instead of 5.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, kThreads == 256 ? 6 : 1) class_kernel(const T* __restrict__ deltas,
                                                                                  FastArgs a) {
  __shared__ FastShared<kThreads> s;
  const int cls = blockIdx.x, image = blockIdx.y;
  const size_t seg = static_cast<size_t>(image) * a.C + cls;
  const int n = cls == a.background_class ? 0 : a.counts[seg];
  const int full = min(n, a.top_k);
  const int target = min(full, a.quota);
  uint64_t last = 0;
  if (target > 0) {  // block-uniform
    uint64_t last_key = 0;
    const int p = process_class<T, kThreads>(deltas, image, cls, target, ~uint64_t{0}, 0, a, s, &last_key);
    if (p < full) last = last_key + 1;
  }
  if (threadIdx.x == 0) a.last[seg] = last;
  if (last_block_of_image<kThreads>(&a.done[image], static_cast<int>(gridDim.x), s)) {
    finish_image<T, kThreads>(deltas, image, true, a, s);
  }
}

// Grid (C, B), blocks as wide as class_kernel's: for an image whose check failed, block f < fails redoes
// failing class f in full (top_k), adding the kept keys below where class_kernel stopped; the other blocks
// exit at once. Only candidates above the check's K-th kept key can still reach the output (that key and the
// K - 1 above it stay kept), so a redone class processes only those: greedy NMS of a prefix is the prefix of
// the full NMS. The image's last working block selects again and writes the outputs.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) redo_kernel(const T* __restrict__ deltas, FastArgs a) {
  __shared__ FastShared<kThreads> s;
  const int image = blockIdx.y;
  const int fails = a.fail_count[image];
  if (static_cast<int>(blockIdx.x) >= fails) return;  // block-uniform; 0 fails: class_kernel wrote the outputs
  const size_t seg0 = static_cast<size_t>(image) * a.C;
  const uint64_t kth = a.kth[image];  // 1 + the K-th kept key, 0 when fewer than K were kept
  for (int f = blockIdx.x; f < fails; f += gridDim.x) {
    const int cls = a.fail_list[seg0 + f];
    const uint64_t min_key = kth != 0 ? a.codec.class_min_above(kth - 1, cls) : 0;
    uint64_t last_key = 0;
    process_class<T, kThreads>(deltas, image, cls, a.top_k, a.last[seg0 + cls] - 1, min_key, a, s, &last_key);
  }
  if (last_block_of_image<kThreads>(&a.done_redo[image], min(fails, static_cast<int>(gridDim.x)), s)) {
    finish_image<T, kThreads>(deltas, image, false, a, s);
  }
}

template <typename T, int kThreads>
void launch_fast(const T* deltas, const FastArgs& fa, int B, int C, cudaStream_t stream) {
  class_kernel<T, kThreads><<<dim3(C, B), kThreads, 0, stream>>>(deltas, fa);
  redo_kernel<T, kThreads><<<dim3(C, B), kThreads, 0, stream>>>(deltas, fa);
}

template <typename T>
cudaError_t launch(const T* deltas, const T* logits, const float* anchors, const Plan& plan, const Params& params,
                   unsigned char* ws, int32_t* num_detections, float* boxes, float* scores, int32_t* labels,
                   cudaStream_t stream) {
  const KeyCodec codec{plan.anchor_bits, plan.class_bits, plan.score_base};
  int* counts = reinterpret_cast<int*>(ws + plan.off_counts);
  int* merged_counts = reinterpret_cast<int*>(ws + plan.off_merged_counts);
  int* kept_counts = reinterpret_cast<int*>(ws + plan.off_kept_counts);
  auto keys_at = [&](size_t offset) { return reinterpret_cast<uint64_t*>(ws + offset); };
  cudaError_t err = cudaMemsetAsync(ws, 0, plan.off_candidates, stream);  // the three counter arrays
  if (err != cudaSuccess) return err;
  const DecodeArgs decode{anchors,
                          {params.box_weights[0], params.box_weights[1], params.box_weights[2], params.box_weights[3]},
                          static_cast<float>(params.image_width), static_cast<float>(params.image_height)};
  const int K = params.max_detections;
  if (plan.A > 0) {
    const ScoreArgs sa{plan.A, plan.C, params.background_class, params.softmax, params.score_threshold, codec,
                       keys_at(plan.off_candidates), counts, reinterpret_cast<unsigned*>(ws + plan.off_score_max),
                       reinterpret_cast<unsigned*>(ws + plan.off_score_min_inv)};
    const dim3 grid(ceil_div(plan.A, kScoreAnchors), plan.B);
    const int threads = kScoreAnchors * kScoreGroups;
    if (plan.staged_scores) {
      score_kernel<T, true><<<grid, threads, score_smem_bytes(true, plan.C), stream>>>(logits, sa);
    } else {
      score_kernel<T, false><<<grid, threads, score_smem_bytes(false, plan.C), stream>>>(logits, sa);
    }
  }
  if (plan.fast) {
    auto ints_at = [&](size_t offset) { return reinterpret_cast<int*>(ws + offset); };
    const FastArgs fa{plan.A, plan.C, plan.top_k, plan.quota, K, params.background_class, plan.kept_capacity,
                      plan.anchor_bits, plan.score_bits + plan.anchor_bits,
                      plan.score_bits + plan.class_bits + plan.anchor_bits, params.iou_threshold, codec, decode,
                      counts, reinterpret_cast<const unsigned*>(ws + plan.off_score_max),
                      reinterpret_cast<const unsigned*>(ws + plan.off_score_min_inv), keys_at(plan.off_candidates),
                      keys_at(plan.off_kept), kept_counts, keys_at(plan.off_last), ints_at(plan.off_fail_list),
                      ints_at(plan.off_fail_count), keys_at(plan.off_kth), ints_at(plan.off_done),
                      ints_at(plan.off_done_redo),
                      num_detections, boxes, scores, labels};
    // Few (image, class) blocks: latency decides, 1024 threads each; many: 256 (more blocks per SM).
    if (static_cast<int64_t>(plan.B) * plan.C <= kFastWideSegments) {
      launch_fast<T, 1024>(deltas, fa, plan.B, plan.C, stream);
    } else {
      launch_fast<T, 256>(deltas, fa, plan.B, plan.C, stream);
    }
    return cudaGetLastError();
  }
  if (plan.A > 0) {
    const int image_key_bits = plan.score_bits + plan.class_bits + plan.anchor_bits;
    segmented_top_k(TopkArgs{keys_at(plan.off_candidates), static_cast<size_t>(plan.A), counts, plan.top_k,
                             plan.score_bits + plan.anchor_bits, keys_at(plan.off_topk)},
                    plan.B * plan.C, plan.A, stream);
    if (params.class_agnostic) {
      const GatherArgs ga{plan.C, plan.top_k, params.background_class, plan.nms_capacity, codec, counts,
                          keys_at(plan.off_topk), keys_at(plan.off_gathered), merged_counts};
      gather_classes_kernel<<<dim3(plan.C, plan.B), 256, 0, stream>>>(ga);
      segmented_top_k(TopkArgs{keys_at(plan.off_gathered), static_cast<size_t>(plan.nms_capacity), merged_counts,
                               plan.nms_capacity, image_key_bits, keys_at(plan.off_merged)},
                      plan.B, plan.nms_capacity, stream);
    }
    const NmsArgs na{plan.A, plan.C, plan.top_k, K, params.background_class, plan.nms_capacity,
                     plan.kept_capacity, params.class_agnostic, params.iou_threshold, codec, decode, counts,
                     keys_at(plan.off_topk), merged_counts, keys_at(plan.off_merged),
                     reinterpret_cast<Box*>(ws + plan.off_nms_boxes), reinterpret_cast<float*>(ws + plan.off_nms_areas),
                     reinterpret_cast<unsigned int*>(ws + plan.off_nms_flags), reinterpret_cast<int*>(ws + plan.off_nms_kept), keys_at(plan.off_kept),
                     kept_counts};
    nms_kernel<T><<<dim3(params.class_agnostic ? 1 : plan.C, plan.B), kNmsThreads, 0, stream>>>(deltas, na);
    segmented_top_k(TopkArgs{keys_at(plan.off_kept), static_cast<size_t>(plan.kept_capacity), kept_counts, K,
                             image_key_bits, keys_at(plan.off_final)},
                    plan.B, plan.kept_capacity, stream);
  }
  const OutputArgs oa{plan.A, K, codec, decode, keys_at(plan.off_final), kept_counts, num_detections, boxes, scores,
                      labels};
  output_kernel<T><<<dim3(ceil_div(K, 128), plan.B), 128, 0, stream>>>(deltas, oa);
  return cudaGetLastError();
}

}  // namespace

size_t decode_nms_cuda_workspace_size(DType /*dtype*/, const Shape& shape, const Params& params) {
  if (validate(shape, params) != nullptr) return 0;
  return make_plan(shape, params).total;
}

int decode_nms_cuda(DType dtype, const void* box_deltas, const void* class_logits, const float* anchors,
                    const Shape& shape, const Params& params, void* workspace, size_t workspace_bytes,
                    int32_t* num_detections, float* boxes, float* scores, int32_t* labels, void* stream) {
  if (validate(shape, params) != nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (shape.batch > 65535 || shape.classes > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (shape.batch == 0) return static_cast<int>(cudaSuccess);
  const Plan plan = make_plan(shape, params);
  if (workspace == nullptr || workspace_bytes < plan.total) return static_cast<int>(cudaErrorInvalidValue);
  auto* ws = static_cast<unsigned char*>(workspace);
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (dtype == DType::kFloat16) {
    err = launch(static_cast<const __half*>(box_deltas), static_cast<const __half*>(class_logits), anchors, plan,
                 params, ws, num_detections, boxes, scores, labels, s);
  } else {
    err = launch(static_cast<const float*>(box_deltas), static_cast<const float*>(class_logits), anchors, plan,
                 params, ws, num_detections, boxes, scores, labels, s);
  }
  return static_cast<int>(err);
}

}  // namespace nms
}  // namespace ssdopt
