// gemm_f32 (declared in owlore.h): fp32 C = alpha A B + beta C on pointers, through torch's BLAS.
#include "owlore.h"

#include <climits>
#include <optional>

namespace owlore {
namespace {

// Fortran BLAS, column-major, 32-bit integers: the sgemm_ torch's own CPU GEMMs call
// (ATen/native/CPUBlas.cpp declares it the same way).
using Sgemm = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

Sgemm find_sgemm() {
  static const Sgemm found = reinterpret_cast<Sgemm>(torch_cpu_symbol("sgemm_"));
  return found;
}

// How BLAS reads a row-major-indexed matrix X (rows x cols): the column-major matrix at
// X's pointer with leading dim `ld` is X^T (X has unit column stride, op "N" gives X^T) or
// X itself (unit row stride, op "T" gives X^T). A dimension of extent 1 has no stride that
// matters. None: no unit stride, or a leading dim BLAS would reject or that overflows int.
struct BlasOperand {
  char op;
  int ld;
};

std::optional<BlasOperand> as_transposed(int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  if (s1 == 1 || cols == 1) {  // row-major: stored column-major as X^T (cols x rows), ld >= cols
    const int64_t ld = rows == 1 ? std::max<int64_t>(cols, 1) : s0;
    if (ld >= std::max<int64_t>(cols, 1) && ld <= INT_MAX) return BlasOperand{'N', static_cast<int>(ld)};
  }
  if (s0 == 1 || rows == 1) {  // column-major: stored as X (rows x cols), ld >= rows
    const int64_t ld = cols == 1 ? std::max<int64_t>(rows, 1) : s1;
    if (ld >= std::max<int64_t>(rows, 1) && ld <= INT_MAX) return BlasOperand{'T', static_cast<int>(ld)};
  }
  return std::nullopt;
}

at::Tensor view_of(const float* data, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, {s0, s1}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

void gemm_f32(float alpha, const Matrix<const float>& A, const Matrix<const float>& B, float beta,
              const Matrix<float>& C) {
  const int64_t h = C.rows, w = C.cols, K = A.cols;
  TORCH_CHECK(A.rows == h && B.rows == K && B.cols == w, "gemm_f32: (", A.rows, " x ", A.cols, ") @ (", B.rows,
              " x ", B.cols, ") into ", h, " x ", w);
  if (h == 0 || w == 0) return;
  // row-major C = A B is column-major C^T = B^T A^T: C^T is C's memory read column-major when C
  // has unit column stride, and B^T, A^T are what as_transposed describes
  const Sgemm sgemm = find_sgemm();
  const auto a = as_transposed(h, K, A.s0, A.s1), b = as_transposed(K, w, B.s0, B.s1);
  const auto c = as_transposed(h, w, C.s0, C.s1);
  if (sgemm != nullptr && a && b && c && c->op == 'N' && h <= INT_MAX && w <= INT_MAX && K <= INT_MAX) {
    const int m_ = static_cast<int>(w), n_ = static_cast<int>(h), k_ = static_cast<int>(K);
    sgemm(&b->op, &a->op, &m_, &n_, &k_, &alpha, B.data, &b->ld, A.data, &a->ld, &beta, C.data, &c->ld);
    return;
  }
  at::Tensor out = view_of(C.data, h, w, C.s0, C.s1);
  out.addmm_(view_of(A.data, h, K, A.s0, A.s1), view_of(B.data, K, w, B.s0, B.s1), beta, alpha);
}

}  // namespace owlore
