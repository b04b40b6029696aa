// Back-project + update, in place:
//   W <- beta * W + alpha * (A B),
// with A B = P N (side="left", P m x r, N r x n) or N Q (side="right", N m x r,
// Q r x n). See owlore_kernels/ops/back_project_update.py for the reference.
//
// The m x n product is never stored. W is updated one tile at a time, each tile
// by one GEMM with that beta and alpha (the optimizer folds weight decay into beta
// and step size and scale into alpha), so they cost no extra pass and W is read
// and written once:
//   fp32 W:      addmm_ straight into the W tile (a strided view);
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

// Below this many multiply-adds per thread a call runs on one thread (as in project_adam.cpp).
constexpr int64_t kMinMacsPerRun = 1 << 20;

// One weight of a call, checked, with its tiling.
struct Weight {
  at::Tensor param, A, B;  // detached; W (m x n) += A (m x r) B (r x n)
  double beta, alpha;
  int64_t tile_rows = 0, tile_cols = 0, row_tiles = 0, col_tiles = 0;
  bool fp32 = true, stage_a = false, stage_b = false;
};

Weight checked_weight(const at::Tensor& param_in, const at::Tensor& proj_in, const at::Tensor& norm_update_in,
                      bool left, double beta, double alpha, const std::string& where) {
  check_cpu_float(param_in, "param" + where);
  check_cpu_proj(proj_in, param_in.scalar_type(), "proj" + where);
  check_cpu_dtype(norm_update_in, at::kFloat, "norm_update" + where);
  TORCH_CHECK(param_in.dim() == 2 && proj_in.dim() == 2 && norm_update_in.dim() == 2,
              "back_project_update_: expected 2-D tensors", where);
  // detach: param is usually a leaf that requires grad, whose views may be updated in
  // place only with autograd off; the alias shares storage, so W is still updated
  // whatever the caller's grad mode.
  Weight w{param_in.detach(), left ? proj_in.detach() : norm_update_in.detach(),
           left ? norm_update_in.detach() : proj_in.detach(), beta, alpha};
  const int64_t m = w.param.size(0), n = w.param.size(1);
  TORCH_CHECK(w.A.size(0) == m && w.B.size(1) == n && w.A.size(1) == w.B.size(0), "back_project_update_: side=",
              left ? "left" : "right", " needs (m, r) @ (r, n) = ", w.param.sizes(), ", got ", w.A.sizes(), " @ ",
              w.B.sizes(), where.empty() ? "" : " for weight ", where);
  w.fp32 = w.param.scalar_type() == at::kFloat;
  w.stage_a = w.A.scalar_type() != at::kFloat;  // a 16-bit P (left)
  w.stage_b = w.B.scalar_type() != at::kFloat;  // a 16-bit Q (right)
  return w;
}

void plan_tiles(Weight& w, bool split) {
  const int64_t m = w.param.size(0), n = w.param.size(1);
  if (m == 0 || n == 0) return;  // nothing to update; the tile arithmetic below divides by m and n
  w.tile_rows = w.fp32 ? m : kTileRowsHalf;
  w.tile_cols = w.fp32 ? balanced_tile_width(n, kMaxPanelColsFp32, split ? at::get_num_threads() : 1) : kTileColsHalf;
  w.row_tiles = ceil_div(m, w.tile_rows);
  w.col_tiles = ceil_div(n, w.tile_cols);
}

void run_tile(const Weight& w, int64_t t, at::Tensor& buf, at::Tensor& buf_a, at::Tensor& buf_b) {
  const int64_t m = w.param.size(0), n = w.param.size(1), r = w.A.size(1);
  const int64_t i0 = (t / w.col_tiles) * w.tile_rows, j0 = (t % w.col_tiles) * w.tile_cols;
  const int64_t h = std::min(w.tile_rows, m - i0), wd = std::min(w.tile_cols, n - j0);
  at::Tensor w_tile = w.param.narrow(0, i0, h).narrow(1, j0, wd);
  at::Tensor a_rows = w.A.narrow(0, i0, h), b_cols = w.B.narrow(1, j0, wd);
  if (w.stage_a) {  // upcast the rows of P this tile needs
    at::Tensor a32 = buf_a.narrow(0, 0, h * r).view({h, r});
    a32.copy_(a_rows);
    a_rows = a32;
  }
  if (w.stage_b) {  // upcast the columns of Q this tile needs
    at::Tensor b32 = buf_b.narrow(0, 0, r * wd).view({r, wd});
    b32.copy_(b_cols);
    b_cols = b32;
  }
  if (w.fp32) {
    w_tile.addmm_(a_rows, b_cols, w.beta, w.alpha);
  } else {
    at::Tensor w32 = buf.narrow(0, 0, h * wd).view({h, wd});
    w32.copy_(w_tile);                             // upcast
    w32.addmm_(a_rows, b_cols, w.beta, w.alpha);  // fp32 math
    w_tile.copy_(w32);                             // round to nearest even at store
  }
}

// Plan the tiles of checked weights, lay them end to end and split them across threads by cost.
void plan_and_run(std::vector<Weight>& weights) {
  int64_t total = 0;
  for (const Weight& w : weights) total += w.param.numel() * w.A.size(1);
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> costs, weight_of, tile_of;
  int64_t buf_floats = 0, a_floats = 0, b_floats = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(weights.size()); ++i) {
    Weight& w = weights[i];
    const int64_t work = w.param.numel() * w.A.size(1);
    // a weight worth a thread or more (of the call's total work) is cut into a multiple of the thread count
    plan_tiles(w, work * threads >= total && work >= 2 * kMinMacsPerRun);
    const int64_t r = w.A.size(1);
    for (int64_t t = 0; t < w.row_tiles * w.col_tiles; ++t) {
      costs.push_back(std::max<int64_t>(1, w.tile_rows * w.tile_cols * (r + 1)));
      weight_of.push_back(i);
      tile_of.push_back(t);
    }
    if (w.row_tiles == 0) continue;
    if (!w.fp32) buf_floats = std::max(buf_floats, w.tile_rows * w.tile_cols);
    if (w.stage_a) a_floats = std::max(a_floats, w.tile_rows * r);
    if (w.stage_b) b_floats = std::max(b_floats, r * w.tile_cols);
  }
  if (costs.empty()) return;
  const auto f32 = weights[0].param.options().dtype(at::kFloat);
  const at::ThreadLocalState caller_state;  // grad/inference mode of the calling thread
  parallel_over_items(costs, kMinMacsPerRun, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard same_state_as_caller(caller_state);
    at::Tensor buf = buf_floats ? at::empty({buf_floats}, f32) : at::Tensor();
    at::Tensor buf_a = a_floats ? at::empty({a_floats}, f32) : at::Tensor();
    at::Tensor buf_b = b_floats ? at::empty({b_floats}, f32) : at::Tensor();
    for (int64_t item = begin; item < end; ++item)
      run_tile(weights[weight_of[item]], tile_of[item], buf, buf_a, buf_b);
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
  std::vector<Weight> weights{checked_weight(param, proj, norm_update, left, beta.to<double>(), alpha.to<double>(), "")};
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
    weights.push_back(checked_weight(params[i], projs[i], norm_updates[i], left, c[i][0], c[i][1],
                                     index_suffix(i, true)));
  if (found != 0.0) return;  // an overflowed step (NaN counts): write nothing
  plan_and_run(weights);
}

}  // namespace owlore
