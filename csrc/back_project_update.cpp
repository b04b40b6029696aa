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
// Tiles are split across threads; each tile's GEMM runs single-threaded.
#include "owlore.h"

#include <ATen/Parallel.h>

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

}  // namespace

void back_project_update_(
    const at::Tensor& param_in,
    const at::Tensor& proj_in,
    const at::Tensor& norm_update_in,
    c10::string_view side,
    const at::Scalar& beta_in,
    const at::Scalar& alpha_in) {
  const bool left = is_left_side(side);
  const double beta = beta_in.to<double>(), alpha = alpha_in.to<double>();
  check_cpu_float(param_in, "param", false);
  check_cpu_float(proj_in, "proj", true);
  check_cpu_float(norm_update_in, "norm_update", true);
  TORCH_CHECK(param_in.dim() == 2 && proj_in.dim() == 2 && norm_update_in.dim() == 2,
              "back_project_update_: expected 2-D tensors");
  // detach: param is usually a leaf that requires grad, whose views may be updated in
  // place only with autograd off; the alias shares storage, so W is still updated
  // whatever the caller's grad mode.
  const at::Tensor param = param_in.detach();
  const at::Tensor A = left ? proj_in.detach() : norm_update_in.detach();  // m x r
  const at::Tensor B = left ? norm_update_in.detach() : proj_in.detach();  // r x n
  const int64_t m = param.size(0), n = param.size(1);
  TORCH_CHECK(A.size(0) == m && B.size(1) == n && A.size(1) == B.size(0), "back_project_update_: side=",
              std::string(side), " needs (m, r) @ (r, n) = ", param.sizes(), ", got ", A.sizes(), " @ ", B.sizes());

  if (m == 0 || n == 0) return;  // nothing to update; the tile arithmetic below divides by m and n

  const bool fp32 = param.scalar_type() == at::kFloat;
  const int64_t tile_rows = fp32 ? m : kTileRowsHalf;
  const int64_t tile_cols = fp32 ? balanced_tile_width(n, kMaxPanelColsFp32, at::get_num_threads()) : kTileColsHalf;
  const int64_t row_tiles = ceil_div(m, tile_rows), col_tiles = ceil_div(n, tile_cols);

  const at::ThreadLocalState caller_state;  // grad/inference mode of the calling thread
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard same_state_as_caller(caller_state);
    at::Tensor buf = fp32 ? at::Tensor() : at::empty({tile_rows * tile_cols}, param.options().dtype(at::kFloat));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = (t / col_tiles) * tile_rows, j0 = (t % col_tiles) * tile_cols;
      const int64_t h = std::min(tile_rows, m - i0), w = std::min(tile_cols, n - j0);
      at::Tensor w_tile = param.narrow(0, i0, h).narrow(1, j0, w);
      const at::Tensor a_rows = A.narrow(0, i0, h), b_cols = B.narrow(1, j0, w);
      if (fp32) {
        w_tile.addmm_(a_rows, b_cols, beta, alpha);
      } else {
        at::Tensor w32 = buf.narrow(0, 0, h * w).view({h, w});
        w32.copy_(w_tile);                       // upcast
        w32.addmm_(a_rows, b_cols, beta, alpha);  // fp32 math
        w_tile.copy_(w32);                       // round to nearest even at store
      }
    }
  });
}

}  // namespace owlore
