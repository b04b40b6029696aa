// Back-project + update, in place:
//   W <- beta * W + alpha * (A B),
// with A B = P N (side="left", P m x r, N r x n) or N Q (side="right", N m x r,
// Q r x n). See owlore_kernels/ops/back_project_update.py for the reference.
//
// The m x n product is never stored. W is updated one tile at a time, each tile
// by one GEMM with that beta and alpha (the optimizer folds weight decay into beta
// and step size and scale into alpha), so they cost no extra pass and W is read
// and written once:
//   fp32 W:      one BLAS GEMM straight into the W tile (gemm_f32 on W's pointer and strides);
//   bf16/fp16 W: the tile is upcast into an fp32 buffer, updated there, and
//                rounded back to nearest even as it is stored (ATen's
//                float -> bfloat16/half conversion is RNE).
// A 16-bit P (or Q) is upcast per tile, the rows (columns) that tile needs.
// The foreach op lays the tiles of all its weights end to end and splits them across
// threads by cost (parallel_over_items in owlore.h); each tile's GEMM runs
// single-threaded. back_project_update_ is that code run on one weight.
// The foreach op takes torch.amp.GradScaler's overflow flag (a one-element CPU tensor, read
// on the host): nonzero, it returns after the checks, before anything is written.
#include "owlore.h"

namespace owlore {
namespace {

// Tile of W. Each tile GEMM packs its rows of A (h x r) and columns of B (r x w)
// again, so big tiles matter. With K = r <= 256 the GEMM streams its C tile once,
// so an fp32 tile (updated in place in W) need not fit in cache: fp32 tiles are
// full-height column panels at most 2048 wide, as many as a multiple of the thread
// count, and pack B once in all and A once per panel. Measured at 4096 x 11008,
// rank 128, 2 threads: 256 x 512 tiles took 107 ms, 4096 x 512 panels 89 ms, one
// 2-thread addmm_ 85 ms. bf16/fp16 tiles are 512 x 512, so that their fp32 copy
// (1 MB) stays in L2 between upcast, GEMM and store.
constexpr int64_t kMaxPanelColsFp32 = 2048;
constexpr int64_t kTileRowsHalf = 512;
constexpr int64_t kTileColsHalf = 512;

// A 16-bit W tile of at least this many elements is upcast and stored by ATen's copy_ (on views of
// the same memory), whose conversions use torch's CPU capability (AVX2 here): the plain loops made
// back_project_update at 4096 x 11008 bf16, rank 128, ~5% slower. Smaller tiles keep the loops,
// where two ATen calls per tile would cost more than they save (64 x 96 is 6K elements).
constexpr int64_t kMinElemsAtenCopy = 1 << 16;

// Below this many multiply-adds per thread a call runs on one thread (as in project_adam.cpp).
constexpr int64_t kMinMacsPerRun = 1 << 20;

// Rounds an fp32 tile (row-major, leading dim ld) to nearest even into a 16-bit W tile:
// c10's float -> bfloat16 / half conversions round to nearest even, as ATen's copy_ does.
template <typename T>
void store_rounded(const float* src, int64_t ld, const Matrix<T>& dst) {
  for (int64_t i = 0; i < dst.rows; ++i)
    for (int64_t j = 0; j < dst.cols; ++j) *dst.at(i, j) = static_cast<T>(src[i * ld + j]);
}

// One weight of a call, checked, with its tiling. Tensors are read and written through
// pointers only (no ATen op sees them), so nothing here records autograd history.
struct Weight {
  StoredMatrix param, A, B;  // W (m x n) += A (m x r) B (r x n)
  double beta, alpha;
  int64_t tile_rows = 0, tile_cols = 0, row_tiles = 0, col_tiles = 0;

  int64_t m() const { return param.rows; }
  int64_t n() const { return param.cols; }
  int64_t r() const { return A.cols; }
  bool fp32() const { return param.dtype == at::kFloat; }
  bool stage_a() const { return A.dtype != at::kFloat; }  // a 16-bit P (left)
  bool stage_b() const { return B.dtype != at::kFloat; }  // a 16-bit Q (right)
};

Weight checked_weight(const at::Tensor& param, const at::Tensor& proj, const at::Tensor& norm_update, bool left,
                      double beta, double alpha, int64_t index) {
  const std::string where = index < 0 ? std::string() : index_suffix(index, true);
  check_cpu_float(param, "param", where);
  check_cpu_proj(proj, param.scalar_type(), "proj", where);
  check_cpu_dtype(norm_update, at::kFloat, "norm_update", where);
  TORCH_CHECK(param.dim() == 2 && proj.dim() == 2 && norm_update.dim() == 2,
              "back_project_update_: expected 2-D tensors", where);
  const at::Tensor& A = left ? proj : norm_update;
  const at::Tensor& B = left ? norm_update : proj;
  const int64_t m = param.size(0), n = param.size(1);
  TORCH_CHECK(A.size(0) == m && B.size(1) == n && A.size(1) == B.size(0), "back_project_update_: side=",
              left ? "left" : "right", " needs (m, r) @ (r, n) = ", param.sizes(), ", got ", A.sizes(), " @ ",
              B.sizes(), where.empty() ? "" : " for weight ", where);
  return Weight{StoredMatrix::of(param), StoredMatrix::of_read_only(A), StoredMatrix::of_read_only(B), beta, alpha};
}

void plan_tiles(Weight& w, bool split) {
  const int64_t m = w.m(), n = w.n();
  if (m == 0 || n == 0) return;  // nothing to update; the tile arithmetic below divides by m and n
  w.tile_rows = w.fp32() ? m : kTileRowsHalf;
  w.tile_cols = w.fp32() ? balanced_tile_width(n, kMaxPanelColsFp32, split ? at::get_num_threads() : 1)
                         : kTileColsHalf;
  w.row_tiles = ceil_div(m, w.tile_rows);
  w.col_tiles = ceil_div(n, w.tile_cols);
}

void run_tile(const Weight& w, int64_t t, float* buf, float* buf_a, float* buf_b) {
  const int64_t r = w.r();
  const int64_t i0 = (t / w.col_tiles) * w.tile_rows, j0 = (t % w.col_tiles) * w.tile_cols;
  const int64_t h = std::min(w.tile_rows, w.m() - i0), wd = std::min(w.tile_cols, w.n() - j0);
  const StoredMatrix a_block = w.A.block(i0, 0, h, r), b_block = w.B.block(0, j0, r, wd);
  const StoredMatrix tile = w.param.block(i0, j0, h, wd);
  Matrix<const float> a_rows{buf_a, h, r, r, 1}, b_cols{buf_b, r, wd, wd, 1};
  if (w.stage_a()) a_block.stage(buf_a, r);  // upcast the rows of P this tile needs
  else a_rows = a_block.as<const float>();
  if (w.stage_b()) b_block.stage(buf_b, wd);  // upcast the columns of Q this tile needs
  else b_cols = b_block.as<const float>();
  const float beta = static_cast<float>(w.beta), alpha = static_cast<float>(w.alpha);
  if (w.fp32()) {
    gemm_f32(alpha, a_rows, b_cols, beta, tile.as<float>());
    return;
  }
  const Matrix<float> tile32{buf, h, wd, wd, 1};
  if (h * wd >= kMinElemsAtenCopy) {  // a big tile: ATen's vectorized conversions, on views of the memory
    at::Tensor stored = at::from_blob(tile.data, {h, wd}, {tile.s0, tile.s1}, at::TensorOptions().dtype(tile.dtype));
    at::Tensor upcast = at::from_blob(buf, {h, wd}, at::TensorOptions().dtype(at::kFloat));
    upcast.copy_(stored);
    gemm_f32(alpha, a_rows, b_cols, beta, tile32);  // fp32 math
    stored.copy_(upcast);                           // round to nearest even at store
    return;
  }
  tile.stage(buf, wd);                             // upcast
  gemm_f32(alpha, a_rows, b_cols, beta, tile32);  // fp32 math
  if (tile.dtype == at::kBFloat16) store_rounded(buf, wd, tile.as<c10::BFloat16>());
  else store_rounded(buf, wd, tile.as<c10::Half>());
}

// Plan the tiles of checked weights, lay them end to end and split them across threads by cost.
void plan_and_run(std::vector<Weight>& weights) {
  int64_t total = 0;
  for (const Weight& w : weights) total += w.m() * w.n() * w.r();
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> costs, weight_of, tile_of;
  int64_t buf_floats = 0, a_floats = 0, b_floats = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(weights.size()); ++i) {
    Weight& w = weights[i];
    const int64_t work = w.m() * w.n() * w.r();
    // a weight worth a thread or more (of the call's total work) is cut into a multiple of the thread count
    plan_tiles(w, work * threads >= total && work >= 2 * kMinMacsPerRun);
    const int64_t r = w.r();
    for (int64_t t = 0; t < w.row_tiles * w.col_tiles; ++t) {
      costs.push_back(std::max<int64_t>(1, w.tile_rows * w.tile_cols * (r + 1)));
      weight_of.push_back(i);
      tile_of.push_back(t);
    }
    if (w.row_tiles == 0) continue;
    if (!w.fp32()) buf_floats = std::max(buf_floats, w.tile_rows * w.tile_cols);
    if (w.stage_a()) a_floats = std::max(a_floats, w.tile_rows * r);
    if (w.stage_b()) b_floats = std::max(b_floats, r * w.tile_cols);
  }
  if (costs.empty()) return;
  parallel_over_items(costs, kMinMacsPerRun, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(buf_floats), buf_a(a_floats), buf_b(b_floats);
    for (int64_t item = begin; item < end; ++item)
      run_tile(weights[weight_of[item]], tile_of[item], buf.data(), buf_a.data(), buf_b.data());
  });
}

}  // namespace

void back_project_update_(
    const at::Tensor& param,
    const at::Tensor& proj,
    const at::Tensor& norm_update,
    c10::string_view side,
    const at::Scalar& beta,
    const at::Scalar& alpha) {
  const bool left = is_left_side(side);
  std::vector<Weight> weights{checked_weight(param, proj, norm_update, left, beta.to<double>(), alpha.to<double>(), -1)};
  plan_and_run(weights);
}

void back_project_update_foreach_(
    at::TensorList params,
    at::TensorList projs,
    at::TensorList norm_updates,
    c10::string_view side,
    const at::Tensor& coefficients,
    const std::optional<at::Tensor>& found_inf) {
  const bool left = is_left_side(side);
  const int64_t count = static_cast<int64_t>(params.size());
  TORCH_CHECK(projs.size() == params.size() && norm_updates.size() == params.size(),
              "back_project_update_foreach_: the lists must have one tensor per weight, got ", params.size(), ", ",
              projs.size(), ", ", norm_updates.size());
  check_foreach_scalars(coefficients, count, 2, "coefficients");
  const double found = amp_scalar(found_inf, "found_inf", 0.0);
  const auto c = coefficients.accessor<double, 2>();
  // every weight is checked before the first one is written
  std::vector<Weight> weights;
  weights.reserve(count);
  for (int64_t i = 0; i < count; ++i)
    weights.push_back(checked_weight(params[i], projs[i], norm_updates[i], left, c[i][0], c[i][1], i));
  if (found != 0.0) return;  // an overflowed step (NaN counts): write nothing
  plan_and_run(weights);
}

}  // namespace owlore
