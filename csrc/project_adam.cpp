// Project + Adam: R = P^T G (left) or G Q^T (right), then, per element of R,
//   m = beta1 m + (1 - beta1) R;  v = beta2 v + (1 - beta2) R^2;
//   N = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps).
// See owlore_kernels/ops/project_adam.py for the reference.
//
// R never makes a round trip through memory: it is computed one tile at a time
// (a block of columns of G for side="left", a block of rows for "right") into a
// per-thread buffer of at most 1 MB that stays in L2 (2 MB/core on the machine this
// was tuned on), and Adam runs on that tile straight away. The tile GEMMs are ATen/BLAS
// calls on views; each thread owns whole tiles, so they run single-threaded.
//
// A bf16/fp16 G is upcast per tile and per K-block, at most 2 MB of fp32 at a time,
// never as a full-size fp32 copy (an fp32 G too, when its row stride would make
// BLAS slow; see tile_gemm).
#include "owlore.h"

#include <ATen/Parallel.h>

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

struct AdamScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, bias1, bias2, eps;
};

// A 2-D fp32 tensor as pointer + strides, for the epilogue's element loop.
struct Strided {
  float* data;
  int64_t s0, s1;
  float& at(int64_t i, int64_t j) const { return data[i * s0 + j * s1]; }
};

// The epilogue: Adam on one rows x cols tile of R (contiguous, leading dim cols),
// whose top-left element is at (i0, j0) of the moments and out. Same operation
// order as the reference, in fp32.
template <bool kUnitStride>
void adam_tile(const float* R, int64_t rows, int64_t cols, int64_t i0, int64_t j0,
               const Strided& m, const Strided& v, const Strided& out, const AdamScalars& a) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* r_row = R + i * cols;
    float* m_row = &m.at(i0 + i, j0);
    float* v_row = &v.at(i0 + i, j0);
    float* o_row = &out.at(i0 + i, j0);
    const int64_t ms = kUnitStride ? 1 : m.s1, vs = kUnitStride ? 1 : v.s1, os = kUnitStride ? 1 : out.s1;
    for (int64_t j = 0; j < cols; ++j) {
      const float g = r_row[j];
      const float mj = a.beta1 * m_row[j * ms] + a.one_minus_beta1 * g;
      const float vj = a.beta2 * v_row[j * vs] + a.one_minus_beta2 * (g * g);
      m_row[j * ms] = mj;
      v_row[j * vs] = vj;
      o_row[j * os] = (mj / a.bias1) / (std::sqrt(vj / a.bias2) + a.eps);
    }
  }
}

void adam_epilogue(const at::Tensor& R, int64_t i0, int64_t j0, const Strided& m, const Strided& v,
                   const Strided& out, const AdamScalars& a) {
  const bool unit = m.s1 == 1 && v.s1 == 1 && out.s1 == 1;
  const float* r = R.const_data_ptr<float>();
  if (unit) adam_tile<true>(r, R.size(0), R.size(1), i0, j0, m, v, out, a);
  else adam_tile<false>(r, R.size(0), R.size(1), i0, j0, m, v, out, a);
}

// Leading dimension of a staged block with `cols` floats per row: rounded up to 16
// floats (whole cache lines), plus 16 more where that would be a multiple of 1024
// floats (4 KB), the strides that tile_gemm stages G to avoid.
inline int64_t padded_ld(int64_t cols) {
  const int64_t ld = ceil_div(cols, 16) * 16;
  return ld % 1024 == 0 ? ld + 16 : ld;
}

// R_tile (h x w, fp32) = A (h x K) @ B (K x w), where one of A, B is a block of G
// and the other is fp32. With `stage`, G is copied into `staging` kStageDepth deep
// along K at a time (upcast if bf16/fp16) and the products are accumulated into R;
// otherwise (fp32 G) BLAS reads G in place. Staging costs ~8% for fp32 G, but it
// pays when G's row stride is a multiple of 4 KB (4096 or 14336 floats) and the
// tile is a narrow column block (side="left"): BLAS packing it then hits the same
// cache sets over and over.
// Measured on 2 threads, rank 128, against one whole-matrix GEMM: 4096 x 16384 took
// 174 ms in place, 152 staged, 140 whole; 4096 x 16000 took 144 in place, 152 staged.
void tile_gemm(at::Tensor& R, const at::Tensor& A, const at::Tensor& B, bool g_is_a, bool stage,
               at::Tensor& staging) {
  if (!stage) {
    at::mm_out(R, A, B);
    return;
  }
  const int64_t K = A.size(1);
  const int64_t g_other = g_is_a ? A.size(0) : B.size(1);  // the non-K extent of the G block
  for (int64_t k0 = 0; k0 < K; k0 += kStageDepth) {
    const int64_t kh = std::min(kStageDepth, K - k0);
    const double beta = k0 == 0 ? 0.0 : 1.0;  // beta = 0 ignores R's old contents
    if (g_is_a) {
      const int64_t ld = padded_ld(kh);
      at::Tensor g32 = staging.narrow(0, 0, g_other * ld).view({g_other, ld}).narrow(1, 0, kh);
      g32.copy_(A.narrow(1, k0, kh));
      R.addmm_(g32, B.narrow(0, k0, kh), beta);
    } else {
      const int64_t ld = padded_ld(g_other);
      at::Tensor g32 = staging.narrow(0, 0, kh * ld).view({kh, ld}).narrow(1, 0, g_other);
      g32.copy_(B.narrow(0, k0, kh));
      R.addmm_(A.narrow(1, k0, kh), g32, beta);
    }
  }
}

}  // namespace

void project_adam_(
    const at::Tensor& grad_in,
    const at::Tensor& proj_in,
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
  check_cpu_float(grad_in, "grad", false);
  check_cpu_float(proj_in, "proj", true);
  check_cpu_float(exp_avg, "exp_avg", true);
  check_cpu_float(exp_avg_sq, "exp_avg_sq", true);
  check_cpu_float(out, "out", true);
  TORCH_CHECK(grad_in.dim() == 2 && proj_in.dim() == 2, "project_adam_: grad and proj must be 2-D");
  // detach: nothing here is differentiable, so the ATen calls below never record
  // autograd history, whatever the caller's grad mode
  const at::Tensor grad = grad_in.detach(), proj = proj_in.detach();
  const int64_t m = grad.size(0), n = grad.size(1);
  const int64_t r = left ? proj.size(1) : proj.size(0);
  TORCH_CHECK(left ? proj.size(0) == m : proj.size(1) == n, "project_adam_: proj shape ", proj.sizes(),
              " does not match grad ", grad.sizes(), " for side=", std::string(side));
  const std::vector<int64_t> low_shape = left ? std::vector<int64_t>{r, n} : std::vector<int64_t>{m, r};
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &out})
    TORCH_CHECK(t->sizes() == at::IntArrayRef(low_shape), "project_adam_: moments and out must be ", low_shape,
                ", got ", t->sizes());

  const double b1 = beta1.to<double>(), b2 = beta2.to<double>();
  const AdamScalars a{
      static_cast<float>(b1),
      static_cast<float>(b2),
      static_cast<float>(1.0 - b1),
      static_cast<float>(1.0 - b2),
      static_cast<float>(bias_correction1.to<double>()),
      static_cast<float>(bias_correction2.to<double>()),
      static_cast<float>(eps.to<double>()),
  };
  const Strided m_s{exp_avg.data_ptr<float>(), exp_avg.stride(0), exp_avg.stride(1)};
  const Strided v_s{exp_avg_sq.data_ptr<float>(), exp_avg_sq.stride(0), exp_avg_sq.stride(1)};
  const Strided o_s{out.data_ptr<float>(), out.stride(0), out.stride(1)};

  const int64_t extent = left ? n : m;  // left tiles split the columns of G, right tiles its rows
  if (extent == 0 || r == 0) return;  // an empty subspace: nothing to update (and no tiles to size)
  const int64_t max_width = std::clamp<int64_t>(kMaxTileElems / std::max<int64_t>(r, 1), 16, kMaxTileWidth);
  const int64_t width = balanced_tile_width(extent, max_width, at::get_num_threads());
  const int64_t tiles = ceil_div(extent, width);
  const auto f32 = grad.options().dtype(at::kFloat);
  const int64_t row_bytes = std::max(grad.stride(0), grad.stride(1)) * grad.element_size();
  // fp32 G is staged only for left tiles (narrow column blocks); right tiles take whole
  // rows of G, which BLAS packs well at any stride (4096^2, rank 128: 40 ms in place,
  // 47.5 ms staged). See tile_gemm.
  const bool stage = grad.scalar_type() != at::kFloat || (left && row_bytes % 4096 == 0);

  const at::ThreadLocalState caller_state;  // grad/inference mode of the calling thread
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard same_state_as_caller(caller_state);
    at::Tensor r_buf = at::empty({r * width}, f32);
    // holds a width x padded_ld(kStageDepth) or kStageDepth x padded_ld(width) block
    at::Tensor staging = stage ? at::empty({(kStageDepth + 16) * (width + 16)}, f32) : at::Tensor();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * width, w = std::min(width, extent - start);
      if (left) {
        at::Tensor R = r_buf.narrow(0, 0, r * w).view({r, w});  // R[:, start:start+w] = P^T G[:, cols]
        tile_gemm(R, proj.t(), grad.narrow(1, start, w), /*g_is_a=*/false, stage, staging);
        adam_epilogue(R, 0, start, m_s, v_s, o_s, a);
      } else {
        at::Tensor R = r_buf.narrow(0, 0, w * r).view({w, r});  // R[rows, :] = G[rows, :] Q^T
        tile_gemm(R, grad.narrow(0, start, w), proj.t(), /*g_is_a=*/true, stage, staging);
        adam_epilogue(R, start, 0, m_s, v_s, o_s, a);
      }
    }
  });
}

}  // namespace owlore
