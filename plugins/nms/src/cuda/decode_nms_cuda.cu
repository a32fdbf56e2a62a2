// SSDDecodeNMS on the GPU (ssdopt_nms.h: decode_nms_cuda, decode_nms_cuda_workspace_size).
//
// Asynchronous kernels on one stream: no host synchronisation and no allocation, so a call can be
// captured in a CUDA graph; all buffers live in a caller-provided workspace whose size depends only on
// (shape, params). Candidates are 64-bit keys, unique within an image: score bits above the inverted
// (class, anchor), so "key descending" is "score descending, then class and anchor ascending" -- the
// CPU kernel's order -- and the (class, anchor) is recovered from the key.
//   1. score_kernel      softmax/sigmoid per anchor (logits staged in shared memory), threshold, and
//                        compaction into per-(image, class) lists: one warp ballot + one atomicAdd per
//                        (warp, class).
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
// Box arithmetic is box_math.h, shared with the CPU kernel; compile with --fmad=false.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cub/block/block_radix_sort.cuh>

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
constexpr size_t kAlign = 256;

__host__ __device__ inline int bits_for(int64_t n) {  // bits to hold values 0..n-1 (at least 1)
  int bits = 1;
  while ((int64_t{1} << bits) < n) ++bits;
  return bits;
}

// Geometry of keys and buffers, computed identically by the workspace query and the launch.
struct Plan {
  int B, A, C;
  int top_k;             // min(pre_nms_top_k, A): candidates per (image, class)
  int nms_capacity;      // candidates per NMS segment: top_k, or C * top_k when class-agnostic
  int kept_capacity;     // kept detections per image: segments * min(nms_capacity, max_detections)
  int anchor_bits, class_bits, score_bits;
  uint32_t score_base;
  int anchors_per_score_block;  // 0: the score kernel reads logits straight from global memory
  size_t off_counts, off_merged_counts, off_kept_counts, off_candidates, off_topk, off_gathered, off_merged;
  size_t off_kept, off_final, off_nms_boxes, off_nms_areas, off_nms_flags, off_nms_kept, total;
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
  p.anchors_per_score_block = 0;
  for (int anchors : {128, 64, 32}) {
    if (static_cast<size_t>(anchors) * p.C * sizeof(float) <= kScoreMaxSmemBytes) {
      p.anchors_per_score_block = anchors;
      break;
    }
  }
  const size_t B = p.B, segments = B * p.C;
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset = align_up(offset + bytes);
    return at;
  };
  // The three counter arrays come first and are cleared by one memset.
  p.off_counts = take(segments * sizeof(int));
  p.off_merged_counts = take(B * sizeof(int));
  p.off_kept_counts = take(B * sizeof(int));
  p.off_candidates = take(segments * p.A * sizeof(uint64_t));
  p.off_topk = take(segments * p.top_k * sizeof(uint64_t));
  const size_t merged = params.class_agnostic ? B * p.nms_capacity * sizeof(uint64_t) : 0;
  p.off_gathered = take(merged);
  p.off_merged = take(merged);
  p.off_kept = take(B * p.kept_capacity * sizeof(uint64_t));
  p.off_final = take(B * params.max_detections * sizeof(uint64_t));
  const size_t nms_scratch = p.nms_capacity > kNmsSmemBoxes ? B * segments_per_image * p.nms_capacity : 0;
  p.off_nms_boxes = take(nms_scratch * sizeof(Box));
  p.off_nms_areas = take(nms_scratch * sizeof(float));
  p.off_nms_flags = take(nms_scratch * sizeof(unsigned int));
  p.off_nms_kept = take(nms_scratch * sizeof(int));
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
};

template <typename T, bool kStaged>
__global__ void score_kernel(const T* __restrict__ logits, ScoreArgs args) {
  extern __shared__ float staged[];
  const int image = blockIdx.y;
  const int first = blockIdx.x * blockDim.x;
  const int anchor = first + threadIdx.x;
  const int C = args.C;
  const bool active = anchor < args.A;
  const T* block_logits = logits + (static_cast<size_t>(image) * args.A + first) * C;
  if (kStaged) {  // coalesced copy of this block's rows
    const int rows = min(static_cast<int>(blockDim.x), args.A - first);
    for (int i = threadIdx.x; i < rows * C; i += blockDim.x) staged[i] = to_float(block_logits[i]);
    __syncthreads();
  }
  auto logit = [&](int c) -> float {
    if (kStaged) return staged[threadIdx.x * C + c];
    return to_float(block_logits[static_cast<size_t>(threadIdx.x) * C + c]);
  };
  // Softmax normaliser; an anchor with NaN, +inf or only -inf logits has NaN scores: no candidate.
  bool valid = active;
  float max_logit = -INFINITY, inv_sum = 1.f;
  if (active && args.softmax) {
    bool has_nan = false;
    for (int c = 0; c < C; ++c) {
      const float x = logit(c);
      has_nan |= (x != x);
      max_logit = x > max_logit ? x : max_logit;
    }
    valid = !has_nan && !isinf(max_logit);
    if (valid) {
      float sum = 0.f;
      for (int c = 0; c < C; ++c) {
        const float e = expf(logit(c) - max_logit);
        if (kStaged) staged[threadIdx.x * C + c] = e;
        sum += e;
      }
      inv_sum = 1.f / sum;
    }
  }
  const int lane = threadIdx.x & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
  int* counts = args.counts + static_cast<size_t>(image) * C;
  for (int c = 0; c < C; ++c) {
    float score = 0.f;
    bool pass = false;
    if (valid && c != args.background_class) {
      if (args.softmax) {
        const float e = kStaged ? staged[threadIdx.x * C + c] : expf(logit(c) - max_logit);
        score = e * inv_sum;
      } else {
        score = 1.f / (1.f + expf(-logit(c)));
      }
      pass = score > args.threshold;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, pass);
    if (ballot == 0) continue;
    int base = 0;
    if (lane == __ffs(ballot) - 1) base = atomicAdd(&counts[c], __popc(ballot));
    base = __shfl_sync(0xffffffffu, base, __ffs(ballot) - 1);
    if (pass) {
      const size_t slot = (static_cast<size_t>(image) * C + c) * args.A + base + __popc(ballot & lanes_below);
      args.candidates[slot] = args.codec.class_key(score, anchor);
    }
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
                       keys_at(plan.off_candidates), counts};
    if (plan.anchors_per_score_block > 0) {
      const int per_block = plan.anchors_per_score_block;
      const size_t smem = static_cast<size_t>(per_block) * plan.C * sizeof(float);
      score_kernel<T, true><<<dim3(ceil_div(plan.A, per_block), plan.B), per_block, smem, stream>>>(logits, sa);
    } else {
      score_kernel<T, false><<<dim3(ceil_div(plan.A, 128), plan.B), 128, 0, stream>>>(logits, sa);
    }
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
