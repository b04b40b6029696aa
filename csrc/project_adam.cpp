// Project + Adam: R = P^T G (left) or G Q^T (right), then, per element of R,
//   m = beta1 m + (1 - beta1) R;  v = beta2 v + (1 - beta2) R^2;
//   N = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps).
// See owlore_kernels/ops/project_adam.py for the reference.
//
// R never makes a round trip through memory: it is computed one tile at a time
// (a block of columns of G for side="left", a block of rows for "right") into a
// per-thread buffer of at most 1 MB that stays in L2 (2 MB/core on the machine this
// was tuned on), and Adam runs on that tile straight away. The tile GEMMs are BLAS
// calls on pointers (gemm_f32 in owlore.h); each thread owns whole tiles, so they run
// single-threaded.
//
// A bf16/fp16 G is upcast per tile and per K-block, at most 2 MB of fp32 at a time,
// never as a full-size fp32 copy (an fp32 G too, when its row stride would make
// BLAS slow; see tile_gemm); a 16-bit P or Q is upcast with it, the matching K-block.
// bf16 moments are upcast per element, updated in fp32, used for N, and stored back
// rounded to nearest even.
//
// The foreach op takes torch.amp.GradScaler's scale and overflow flag (one-element CPU
// tensors, read on the host): R is divided by grad_scale in fp32 before the moments
// (x / 1 is exact, so no scale is the same code with 1), and a nonzero found_inf returns
// after the checks, before anything is written.
//
// The foreach op lays the tiles of all its weights end to end and splits them across
// threads by cost (parallel_over_items in owlore.h); project_adam_ is that code run on
// one weight.
#include "owlore.h"

#include <ATen/Version.h>

#include <cmath>

namespace owlore {
namespace {

// Tile size. Each tile GEMM packs the whole projection matrix again (P is m x r,
// 2 MB at 4096 x 128), so the packing costs 1/width of the tile's work: wide
// tiles matter. Measured at 4096 x 11008, rank 128, 2 threads: widths 256 / 512 /
// 928 / 1376 took 129 / 106 / 96 / 93 ms against 93 ms for one 2-thread GEMM.
// So: at most 2048 wide and at most 256K floats (1 MB) of R per tile, which with
// the moment rows of the epilogue still fits a 2 MB L2, and a tile count that is a
// multiple of the thread count.
constexpr int64_t kMaxTileWidth = 2048;
constexpr int64_t kMaxTileElems = 1 << 18;
// G is staged (and upcast, if bf16/fp16) kStageDepth rows (left) or columns
// (right) at a time: deep enough that each block is an efficient GEMM (BLAS
// kernels block K by ~256 anyway), and at most 256 x 2048 floats = 2 MB.
constexpr int64_t kStageDepth = 256;

// Below this many multiply-adds per thread a call runs on one thread. Measured on one
// thread of a 2-core AMD EPYC (loaded): 64 x 96 rank 16 (98K multiply-adds) took 0.047 ms,
// 256 x 512 rank 16 (2.1M) 0.22 ms, so 1M of them is ~0.1 ms, over 5x the fork and join of
// a parallel region on a quiet machine (a few us; estimated, not measured here). On a
// machine whose other core is busy a parallel region costs far more: the same 2.1M call on
// 2 threads took 24 ms at a load of 20, waiting for the second core.
constexpr int64_t kMinMacsPerRun = 1 << 20;

struct AdamScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, bias1, bias2, eps;
  float grad_scale;  // R is divided by it (1: no scale, exact)
};

// The epilogue: Adam on one rows x cols tile of R (contiguous, leading dim cols),
// whose top-left element is at (i0, j0) of the moments and out. Same operation
// order as the reference, in fp32; moments of type state_t (fp32, or bf16 upcast on
// load and rounded to nearest even on store, after N is computed from the fp32 values).
// The unit-stride loop vectorizes (setup.py's -fno-math-errno lets sqrt do so), 8 lanes
// where torch's CPU capability is AVX2 or above (a second copy compiled for it, chosen at
// run time; no FMA, so no contraction), 4 otherwise. +, *, / and sqrt are correctly rounded in every lane, so
// every copy computes what the scalar loop would, bit for bit.
template <typename state_t, bool kUnitStride>
inline __attribute__((always_inline)) void adam_tile_body(
    const float* R, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const Matrix<state_t>& m,
    const Matrix<state_t>& v, const Matrix<float>& out, const AdamScalars& a) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* r_row = R + i * cols;
    state_t* m_row = m.at(i0 + i, j0);
    state_t* v_row = v.at(i0 + i, j0);
    float* o_row = out.at(i0 + i, j0);
    const int64_t ms = kUnitStride ? 1 : m.s1, vs = kUnitStride ? 1 : v.s1, os = kUnitStride ? 1 : out.s1;
    for (int64_t j = 0; j < cols; ++j) {
      const float g = r_row[j] / a.grad_scale;
      const float mj = a.beta1 * static_cast<float>(m_row[j * ms]) + a.one_minus_beta1 * g;
      const float vj = a.beta2 * static_cast<float>(v_row[j * vs]) + a.one_minus_beta2 * (g * g);
      m_row[j * ms] = static_cast<state_t>(mj);
      v_row[j * vs] = static_cast<state_t>(vj);
      o_row[j * os] = (mj / a.bias1) / (std::sqrt(vj / a.bias2) + a.eps);
    }
  }
}

template <typename state_t>
void adam_tile_unit(const float* R, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const Matrix<state_t>& m,
                    const Matrix<state_t>& v, const Matrix<float>& out, const AdamScalars& a) {
  adam_tile_body<state_t, true>(R, rows, cols, i0, j0, m, v, out, a);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define OWLORE_AVX2_EPILOGUE 1
template <typename state_t>
__attribute__((target("avx2"))) void adam_tile_unit_avx2(
    const float* R, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const Matrix<state_t>& m,
    const Matrix<state_t>& v, const Matrix<float>& out, const AdamScalars& a) {
  adam_tile_body<state_t, true>(R, rows, cols, i0, j0, m, v, out, a);
}
#endif

template <typename state_t>
void adam_epilogue_as(const float* R, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const Matrix<state_t>& m,
                      const Matrix<state_t>& v, const Matrix<float>& out, const AdamScalars& a) {
  if (!(m.s1 == 1 && v.s1 == 1 && out.s1 == 1)) {
    adam_tile_body<state_t, false>(R, rows, cols, i0, j0, m, v, out, a);
    return;
  }
#ifdef OWLORE_AVX2_EPILOGUE
  // torch's own choice: its CPU capability is AVX2 or AVX512 only where the CPU has AVX2, and
  // ATEN_CPU_CAPABILITY=default lowers it, so that setting runs the 4-lane copy here too
  static const bool avx2 = at::get_cpu_capability() != "DEFAULT" && __builtin_cpu_supports("avx2");
  if (avx2) {
    adam_tile_unit_avx2<state_t>(R, rows, cols, i0, j0, m, v, out, a);
    return;
  }
#endif
  adam_tile_unit<state_t>(R, rows, cols, i0, j0, m, v, out, a);
}

// Leading dimension of a staged block with `cols` floats per row: rounded up to 16
// floats (whole cache lines), plus 16 more where that would be a multiple of 1024
// floats (4 KB), the strides that tile_gemm stages G to avoid.
inline int64_t padded_ld(int64_t cols) {
  const int64_t ld = ceil_div(cols, 16) * 16;
  return ld % 1024 == 0 ? ld + 16 : ld;
}

// Floats of staging for an operand block of `rows` x kStageDepth (A) or kStageDepth x
// `cols` (B): padded_ld adds at most 32 floats per row.
inline int64_t staging_floats_a(int64_t rows) { return rows * (kStageDepth + 32); }
inline int64_t staging_floats_b(int64_t cols) { return kStageDepth * (cols + 32); }

// R_tile (h x w, fp32, contiguous) = A (h x K) @ B (K x w), where one of A, B is a block of G
// and the other is the projection. An operand marked for staging is copied into its
// staging buffer kStageDepth deep along K at a time (upcast if bf16/fp16) and the
// products are accumulated into R; otherwise BLAS reads it in place. G is staged when
// it is 16-bit, and an fp32 G too where its row stride would make BLAS slow: staging
// costs ~8% for fp32 G, but it pays when G's row stride is a multiple of 4 KB (4096 or
// 14336 floats) and the tile is a narrow column block (side="left"): BLAS packing it
// then hits the same cache sets over and over. A 16-bit projection is staged with G
// (it is 16-bit only next to a 16-bit G).
// Measured on 2 threads, rank 128, against one whole-matrix GEMM: 4096 x 16384 took
// 174 ms in place, 152 staged, 140 whole; 4096 x 16000 took 144 in place, 152 staged.
void tile_gemm(float* R, const StoredMatrix& A, const StoredMatrix& B, bool stage_a, bool stage_b, float* staging_a,
               float* staging_b) {
  const int64_t h = A.rows, K = A.cols, w = B.cols;
  const Matrix<float> out{R, h, w, w, 1};
  if (!stage_a && !stage_b) {
    gemm_f32(1.0f, A.as<const float>(), B.as<const float>(), 0.0f, out);
    return;
  }
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kStageDepth) {
    const int64_t kh = std::min(kStageDepth, K - k0);
    const float beta = k0 == 0 ? 0.0f : 1.0f;  // beta = 0 ignores R's old contents
    const StoredMatrix a_block = A.block(0, k0, h, kh), b_block = B.block(k0, 0, kh, w);
    Matrix<const float> a{staging_a, h, kh, padded_ld(kh), 1}, b{staging_b, kh, w, padded_ld(w), 1};
    if (stage_a) a_block.stage(staging_a, a.s0);
    else a = a_block.as<const float>();
    if (stage_b) b_block.stage(staging_b, b.s0);
    else b = b_block.as<const float>();
    gemm_f32(1.0f, a, b, beta, out);
  }
}

// One weight of a call, checked, with its tiling. Tensors are read and written through
// pointers only (no ATen op sees them), so nothing here records autograd history.
struct Weight {
  StoredMatrix grad, proj, exp_avg, exp_avg_sq;  // the moments fp32 or bf16 (one dtype)
  Matrix<float> out;
  float bias1, bias2;
  int64_t r, extent, width, tiles;
  bool stage_g, stage_p;
};

// The memory-safety checks of one weight (the argument checks with the user-facing
// messages run in Python); returns it with its tiling still unset. `index` names the
// weight of a foreach call in messages (-1: a single-weight call).
Weight checked_weight(const at::Tensor& grad, const at::Tensor& proj, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const at::Tensor& out, bool left, double bias1, double bias2,
                      int64_t index) {
  const std::string where = index < 0 ? std::string() : index_suffix(index, true);
  check_cpu_float(grad, "grad", where);
  check_cpu_proj(proj, grad.scalar_type(), "proj", where);
  check_cpu_moments(exp_avg, exp_avg_sq, where, /*allow_fp64=*/false);
  check_cpu_dtype(out, at::kFloat, "out", where);
  TORCH_CHECK(grad.dim() == 2 && proj.dim() == 2, "project_adam_: grad", where, " and proj", where, " must be 2-D");
  const int64_t m = grad.size(0), n = grad.size(1);
  const int64_t r = left ? proj.size(1) : proj.size(0);
  TORCH_CHECK(left ? proj.size(0) == m : proj.size(1) == n, "project_adam_: proj", where, " shape ", proj.sizes(),
              " does not match grad", where, " ", grad.sizes(), " for side=", left ? "left" : "right");
  const int64_t low0 = left ? r : m, low1 = left ? n : r;
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &out})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == low0 && t->size(1) == low1, "project_adam_: moments and out", where,
                " must be [", low0, ", ", low1, "], got ", t->sizes());
  TORCH_CHECK(bias1 > 0.0 && bias1 <= 1.0 && bias2 > 0.0 && bias2 <= 1.0, "project_adam_: bias corrections",
              where, " must be in (0, 1], got ", bias1, " and ", bias2);
  Weight w{StoredMatrix::of_read_only(grad), StoredMatrix::of_read_only(proj), StoredMatrix::of(exp_avg),
           StoredMatrix::of(exp_avg_sq), StoredMatrix::of(out).as<float>(), static_cast<float>(bias1),
           static_cast<float>(bias2), r, left ? n : m, 0, 0, false, false};
  return w;
}

// Tile width and count of a weight. At most 2048 wide and 256K floats (1 MB) of R per
// tile; a weight that alone is worth a thread or more (`split`) gets a tile count that is
// a multiple of the thread count, so a static split gives every thread the same number.
void plan_tiles(Weight& w, bool left, bool split) {
  if (w.extent == 0 || w.r == 0) return;  // an empty subspace: nothing to update
  const int64_t max_width = std::clamp<int64_t>(kMaxTileElems / w.r, 16, kMaxTileWidth);
  w.width = balanced_tile_width(w.extent, max_width, split ? at::get_num_threads() : 1);
  w.tiles = ceil_div(w.extent, w.width);
  const int64_t row_bytes = std::max(w.grad.s0, w.grad.s1) * static_cast<int64_t>(c10::elementSize(w.grad.dtype));
  // fp32 G is staged only for left tiles (narrow column blocks); right tiles take whole
  // rows of G, which BLAS packs well at any stride (4096^2, rank 128: 40 ms in place,
  // 47.5 ms staged). See tile_gemm.
  w.stage_g = w.grad.dtype != at::kFloat || (left && row_bytes % 4096 == 0);
  w.stage_p = w.proj.dtype != at::kFloat;
}

// Work of one tile, in multiply-adds: the GEMM's K x width x r (the epilogue's width x r
// elementwise work is small next to it for K >= 16).
inline int64_t tile_cost(const Weight& w, bool left) {
  const int64_t depth = left ? w.grad.rows : w.grad.cols;
  return std::max<int64_t>(1, (depth + 1) * w.width * w.r);
}

void adam_epilogue(const Weight& w, const float* R, int64_t rows, int64_t cols, int64_t i0, int64_t j0,
                   const AdamScalars& a) {
  if (w.exp_avg.dtype == at::kBFloat16) {
    adam_epilogue_as<c10::BFloat16>(R, rows, cols, i0, j0, w.exp_avg.as<c10::BFloat16>(),
                                    w.exp_avg_sq.as<c10::BFloat16>(), w.out, a);
  } else {
    adam_epilogue_as<float>(R, rows, cols, i0, j0, w.exp_avg.as<float>(), w.exp_avg_sq.as<float>(), w.out, a);
  }
}

// Every tile of every weight, end to end, split across threads by cost.
void run_weights(const std::vector<Weight>& weights, bool left, const AdamScalars& base) {
  std::vector<int64_t> costs, weight_of, tile_of;
  int64_t r_floats = 0, stage_a_floats = 0, stage_b_floats = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(weights.size()); ++i) {
    const Weight& w = weights[i];
    for (int64_t t = 0; t < w.tiles; ++t) {
      costs.push_back(tile_cost(w, left));
      weight_of.push_back(i);
      tile_of.push_back(t);
    }
    if (w.tiles == 0) continue;
    r_floats = std::max(r_floats, w.r * w.width);
    // left: A = P^T (r x K), B = G block (K x width); right: A = G block (width x K), B = Q^T (K x r)
    const bool stage_a = left ? w.stage_p : w.stage_g, stage_b = left ? w.stage_g : w.stage_p;
    if (stage_a) stage_a_floats = std::max(stage_a_floats, staging_floats_a(left ? w.r : w.width));
    if (stage_b) stage_b_floats = std::max(stage_b_floats, staging_floats_b(left ? w.width : w.r));
  }
  if (costs.empty()) return;
  parallel_over_items(costs, kMinMacsPerRun, [&](int64_t begin, int64_t end) {
    std::vector<float> r_buf(r_floats), staging_a(stage_a_floats), staging_b(stage_b_floats);
    for (int64_t item = begin; item < end; ++item) {
      const Weight& w = weights[weight_of[item]];
      AdamScalars a = base;
      a.bias1 = w.bias1;
      a.bias2 = w.bias2;
      const int64_t start = tile_of[item] * w.width, width = std::min(w.width, w.extent - start);
      const StoredMatrix proj_t = w.proj.t();  // P^T, Q^T
      if (left) {  // R[:, cols] = P^T G[:, cols], r x width
        tile_gemm(r_buf.data(), proj_t, w.grad.block(0, start, w.grad.rows, width), w.stage_p, w.stage_g,
                  staging_a.data(), staging_b.data());
        adam_epilogue(w, r_buf.data(), w.r, width, 0, start, a);
      } else {  // R[rows, :] = G[rows, :] Q^T, width x r
        tile_gemm(r_buf.data(), w.grad.block(start, 0, width, w.grad.cols), proj_t, w.stage_g, w.stage_p,
                  staging_a.data(), staging_b.data());
        adam_epilogue(w, r_buf.data(), width, w.r, start, 0, a);
      }
    }
  });
}

AdamScalars adam_scalars(double beta1, double beta2, double eps) {
  return AdamScalars{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
                     static_cast<float>(1.0 - beta2), 1.0f, 1.0f, static_cast<float>(eps), 1.0f};
}

// Plan the tiles of checked weights and run them.
void plan_and_run(std::vector<Weight>& weights, bool left, const AdamScalars& a) {
  // a weight worth a thread or more (of the call's total work) is cut into a multiple of the thread count
  int64_t total = 0;
  std::vector<int64_t> work(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const Weight& w = weights[i];
    work[i] = w.grad.rows * w.grad.cols * w.r;
    total += work[i];
  }
  const int64_t threads = at::get_num_threads();
  for (size_t i = 0; i < weights.size(); ++i)
    plan_tiles(weights[i], left, work[i] * threads >= total && work[i] >= kMinMacsPerRun * 2);
  run_weights(weights, left, a);
}

}  // namespace

void project_adam_(
    const at::Tensor& grad,
    const at::Tensor& proj,
    const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq,
    const at::Tensor& out,
    c10::string_view side,
    const at::Scalar& beta1,
    const at::Scalar& beta2,
    const at::Scalar& eps,
    const at::Scalar& bias_correction1,
    const at::Scalar& bias_correction2) {
  const bool left = is_left_side(side);
  std::vector<Weight> weights{checked_weight(grad, proj, exp_avg, exp_avg_sq, out, left,
                                             bias_correction1.to<double>(), bias_correction2.to<double>(), -1)};
  plan_and_run(weights, left, adam_scalars(beta1.to<double>(), beta2.to<double>(), eps.to<double>()));
}

void project_adam_foreach_(
    at::TensorList grads,
    at::TensorList projs,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList outs,
    c10::string_view side,
    double beta1,
    double beta2,
    double eps,
    const at::Tensor& bias_corrections,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf) {
  const bool left = is_left_side(side);
  const int64_t count = static_cast<int64_t>(grads.size());
  TORCH_CHECK(projs.size() == grads.size() && exp_avgs.size() == grads.size() &&
                  exp_avg_sqs.size() == grads.size() && outs.size() == grads.size(),
              "project_adam_foreach_: the lists must have one tensor per weight, got ", grads.size(), ", ",
              projs.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", outs.size());
  check_foreach_scalars(bias_corrections, count, 2, "bias_corrections");
  const double scale = amp_scalar(grad_scale, "grad_scale", 1.0);
  const double found = amp_scalar(found_inf, "found_inf", 0.0);
  const auto bc = bias_corrections.accessor<double, 2>();
  // every weight is checked before the first one is written
  std::vector<Weight> weights;
  weights.reserve(count);
  for (int64_t i = 0; i < count; ++i)
    weights.push_back(checked_weight(grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], outs[i], left, bc[i][0],
                                     bc[i][1], i));
  if (found != 0.0) return;  // an overflowed step (NaN counts): write nothing
  AdamScalars a = adam_scalars(beta1, beta2, eps);
  a.grad_scale = static_cast<float>(scale);
  plan_and_run(weights, left, a);
}

}  // namespace owlore
