// Outlier count: mean(score) and #(score > threshold * mean) over a list of tensors,
// with score = |w| or |w_ij| * s_j (s over the last dim). See owlore_kernels/ops/outlier_count.py.
//
// Two passes over the data: mean first, then count (one pass would need a
// histogram of scores). Nothing full-size is allocated: each pass reads the
// weights once, in row segments, upcasting bf16/fp16 as it loads.
//
// Accumulation: fp32 partial sums over blocks of at most kSumBlock elements,
// kept in kLanes independent lanes (so the compiler can use SIMD registers
// without reassociating one serial sum), folded into a per-task double; tasks
// combine in double. The mean is rounded to fp32 at the end, as the reference's
// fp32 sum is. Worst-case fp32 error per block is ~kSumBlock/kLanes * 2^-24
// = 64 * 6e-8 = 4e-6 relative, and the double fold adds nothing measurable.
#include "owlore.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace owlore {
namespace {

constexpr int kLanes = 16;             // independent fp32 accumulators (one AVX-512 / two AVX2 registers)
constexpr int64_t kSumBlock = 1024;    // elements per fp32 partial before folding into double
constexpr int64_t kSegment = 16384;    // columns per work unit: a long 1-D tensor still splits across threads
constexpr int64_t kGrainElems = 1 << 16;  // ~64K elements per task amortises the OpenMP fork

// A tensor seen as rows x cols with element strides. 0-d and 1-d tensors are one row;
// 2-d tensors keep their strides (a transposed weight costs no copy); 3+-d tensors are
// reshaped to (-1, last dim), which copies only when no such view exists.
struct Rows2D {
  at::Tensor keep_alive;  // the tensor the pointer below points into
  int64_t rows, cols, row_stride, col_stride;
};

Rows2D as_rows(const at::Tensor& t) {
  if (t.dim() == 2) return {t, t.size(0), t.size(1), t.stride(0), t.stride(1)};
  if (t.dim() == 1) return {t, 1, t.size(0), 0, t.stride(0)};
  if (t.dim() == 0) return {t, 1, 1, 0, 1};
  at::Tensor flat = t.reshape({-1, t.size(-1)});
  return {flat, flat.size(0), flat.size(1), flat.stride(0), flat.stride(1)};
}

template <typename scalar_t, bool kScaled>
inline float score(const scalar_t* x, const float* s, int64_t j, int64_t col_stride) {
  float a = std::fabs(static_cast<float>(x[j * col_stride]));
  if constexpr (kScaled) a *= s[j];
  return a;
}

// Sum of scores over columns [c0, c1) of one row.
template <typename scalar_t, bool kScaled>
double segment_sum(const scalar_t* row, const float* s, int64_t c0, int64_t c1, int64_t col_stride) {
  double total = 0.0;
  for (int64_t b = c0; b < c1; b += kSumBlock) {
    const int64_t e = std::min(c1, b + kSumBlock);
    float lanes[kLanes] = {};
    int64_t j = b;
    if (col_stride == 1) {
      for (; j + kLanes <= e; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += score<scalar_t, kScaled>(row, s, j + l, 1);
    }
    float block = 0.0f;
    for (; j < e; ++j) block += score<scalar_t, kScaled>(row, s, j, col_stride);
    for (int l = 0; l < kLanes; ++l) block += lanes[l];
    total += block;
  }
  return total;
}

// Number of scores > cut over columns [c0, c1) of one row.
template <typename scalar_t, bool kScaled>
int64_t segment_count(const scalar_t* row, const float* s, int64_t c0, int64_t c1, int64_t col_stride, float cut) {
  int64_t count = 0;
  if (col_stride == 1) {
    int32_t lanes[kLanes] = {};  // a segment is <= kSegment long, far below 2^31
    int64_t j = c0;
    for (; j + kLanes <= c1; j += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += score<scalar_t, kScaled>(row, s, j + l, 1) > cut;
    for (int l = 0; l < kLanes; ++l) count += lanes[l];
    c0 = j;
  }
  for (int64_t j = c0; j < c1; ++j) count += score<scalar_t, kScaled>(row, s, j, col_stride) > cut;
  return count;
}

// Runs fn(row_pointer, c0, c1) over (row, column segment) units in parallel and
// combines the per-task results with +.
template <typename scalar_t, typename acc_t, typename Fn>
acc_t reduce_segments(const Rows2D& v, const Fn& fn) {
  const int64_t segs = ceil_div(v.cols, kSegment);
  const int64_t units = v.rows * segs;
  const int64_t unit_elems = std::min(v.cols, kSegment);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / unit_elems);
  const auto* base = v.keep_alive.const_data_ptr<scalar_t>();
  return at::parallel_reduce(
      0, units, grain, acc_t(0),
      [&](int64_t u0, int64_t u1, acc_t acc) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t r = u / segs, c0 = (u % segs) * kSegment;
          acc += fn(base + r * v.row_stride, c0, std::min(v.cols, c0 + kSegment));
        }
        return acc;
      },
      [](acc_t a, acc_t b) { return a + b; });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> outlier_count(
    at::TensorList tensors,
    double threshold,
    const c10::List<std::optional<at::Tensor>>& col_scales) {
  TORCH_CHECK(!tensors.empty(), "outlier_count: tensors must not be empty");
  TORCH_CHECK(col_scales.size() == tensors.size(), "outlier_count: need one col_scales entry per tensor");

  std::vector<Rows2D> views;
  std::vector<at::Tensor> scales;  // fp32, contiguous, or undefined (no scale)
  int64_t numel = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    check_cpu_float(tensors[k], "outlier_count: tensors", "[" + std::to_string(k) + "]");
    views.push_back(as_rows(tensors[k].detach()));
    numel += tensors[k].numel();
    const std::optional<at::Tensor> s = col_scales.get(k);
    if (s.has_value() && s->defined()) {
      TORCH_CHECK(s->dim() == 1 && s->numel() == views.back().cols,
                  "outlier_count: col_scales[k] must be 1-D over the last dim of tensors[k]");
      scales.push_back(s->detach().to(at::kFloat).contiguous());  // a vector, not full-size
    } else {
      scales.emplace_back();
    }
  }
  TORCH_CHECK(numel > 0, "outlier_count: tensors are empty");

  // Pass 1: the mean.
  double total = 0.0;
  for (size_t k = 0; k < views.size(); ++k) {
    const Rows2D& v = views[k];
    const float* s = scales[k].defined() ? scales[k].const_data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.keep_alive.scalar_type(), "outlier_sum", [&] {
      total += reduce_segments<scalar_t, double>(v, [&](const scalar_t* row, int64_t c0, int64_t c1) {
        return s ? segment_sum<scalar_t, true>(row, s, c0, c1, v.col_stride)
                 : segment_sum<scalar_t, false>(row, s, c0, c1, v.col_stride);
      });
    });
  }
  // fp32 mean and fp32 cut, as in the reference (an fp32 tensor times a Python float).
  const float mean = static_cast<float>(total / static_cast<double>(numel));
  const float cut = mean * static_cast<float>(threshold);

  // Pass 2: the count.
  int64_t count = 0;
  for (size_t k = 0; k < views.size(); ++k) {
    const Rows2D& v = views[k];
    const float* s = scales[k].defined() ? scales[k].const_data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.keep_alive.scalar_type(), "outlier_count", [&] {
      count += reduce_segments<scalar_t, int64_t>(v, [&](const scalar_t* row, int64_t c0, int64_t c1) {
        return s ? segment_count<scalar_t, true>(row, s, c0, c1, v.col_stride, cut)
                 : segment_count<scalar_t, false>(row, s, c0, c1, v.col_stride, cut);
      });
    });
  }
  const auto opts = tensors[0].options();
  return {at::scalar_tensor(mean, opts.dtype(at::kFloat)), at::scalar_tensor(count, opts.dtype(at::kLong))};
}

}  // namespace owlore
