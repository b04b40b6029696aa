// Shared declarations for the C++ CPU backend of owlore-kernels.
//
// Each op is defined once, in Python (owlore_kernels/ops/*.py: schema, argument
// checks, pure-torch reference); registration.cpp registers these functions as
// its CPU kernels. The TORCH_CHECKs here only guard memory safety (dtype, device,
// shapes) for direct callers of torch.ops.owlore.*; the argument checks with the
// user-facing messages run once, in Python.
//
// Threading: each op cuts its work into items (tiles of one weight, or element
// chunks), lays the items of all the weights of a call end to end, and splits that
// list across threads in contiguous runs of about equal cost (parallel_over_items
// below, on at::parallel_for: torch's own OpenMP runtime; setup.py links the same
// libgomp that torch ships). Many small weights thus go one per task with each
// weight's tiles serial inside, and one big weight splits by its tiles. BLAS calls
// made inside a parallel region run single-threaded, so each thread owns whole
// items and there is no synchronisation per item. Worker threads do not inherit the
// caller's thread-local state (grad mode, inference mode), so the item loops
// restore it with at::ThreadLocalStateGuard before calling ATen ops.
//
// The single-weight ops are the foreach ops' code run on a list of one weight.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace owlore {

std::tuple<at::Tensor, at::Tensor> outlier_count(
    at::TensorList tensors,
    double threshold,
    const c10::List<std::optional<at::Tensor>>& col_scales);

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
    const at::Scalar& bias_correction2);

void back_project_update_(
    const at::Tensor& param,
    const at::Tensor& proj,
    const at::Tensor& norm_update,
    c10::string_view side,
    const at::Scalar& beta,
    const at::Scalar& alpha);

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
    const std::optional<at::Tensor>& found_inf);

void back_project_update_foreach_(
    at::TensorList params,
    at::TensorList projs,
    at::TensorList norm_updates,
    c10::string_view side,
    const at::Tensor& coefficients,
    const std::optional<at::Tensor>& found_inf);

void adamw_foreach_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    c10::string_view variant,
    double beta1,
    double beta2,
    double eps,
    const at::Tensor& coefficients,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf);

// ---------------------------------------------------------------------------
// helpers shared by the kernels

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Split `extent` into tiles of at most `max_width` (rounded up to a multiple of 16,
// whole cache lines of fp32) whose count is a multiple of `threads`, so a static
// split gives every thread the same number of tiles; returns the tile width.
inline int64_t balanced_tile_width(int64_t extent, int64_t max_width, int64_t threads) {
  int64_t tiles = ceil_div(extent, std::max<int64_t>(max_width, 1));
  tiles = ceil_div(tiles, threads) * threads;
  return ceil_div(ceil_div(extent, tiles), 16) * 16;
}

// "left" -> true, "right" -> false; anything else is an error.
inline bool is_left_side(c10::string_view side) {
  TORCH_CHECK(side == "left" || side == "right", "side must be 'left' or 'right', got '", std::string(side), "'");
  return side == "left";
}

inline bool is_16bit(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// Memory-safety checks of the kernels (the user-facing ones run once, in Python).
// `name` and `where` name the tensor, e.g. "grads" and "[3]"; TORCH_CHECK formats the
// message only when a check fails.
inline void check_cpu(const at::Tensor& t, const char* name, const std::string& where = std::string()) {
  TORCH_CHECK(t.device().is_cpu(), name, where, " must be a CPU tensor, got ", t.device());
}

// grad or param: fp32, bf16 or fp16
inline void check_cpu_float(const at::Tensor& t, const char* name, const std::string& where = std::string()) {
  check_cpu(t, name, where);
  TORCH_CHECK(t.scalar_type() == at::kFloat || is_16bit(t.scalar_type()), name, where,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// a tensor of exactly one dtype
inline void check_cpu_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name,
                            const std::string& where = std::string()) {
  check_cpu(t, name, where);
  TORCH_CHECK(t.scalar_type() == dtype, name, where, " must be ", dtype, ", got ", t.scalar_type());
}

// P or Q next to a grad/param of dtype `full`: fp32, or that 16-bit dtype
inline void check_cpu_proj(const at::Tensor& t, at::ScalarType full, const char* name,
                           const std::string& where = std::string()) {
  check_cpu(t, name, where);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == full, name, where, " must be float32 or ", full,
              ", got ", t.scalar_type());
}

// Adam moments: fp32 or bf16 (fp64 too where `allow_fp64`), the two of a weight alike.
// `where` follows the names exp_avg / exp_avg_sq (adamw: "s[3]", making exp_avgs[3]).
inline void check_cpu_moments(const at::Tensor& m, const at::Tensor& v, const std::string& where, bool allow_fp64) {
  check_cpu(m, "exp_avg", where);
  check_cpu(v, "exp_avg_sq", where);
  const auto t = m.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || (allow_fp64 && t == at::kDouble), "exp_avg", where,
              " must be float32 or bfloat16, got ", t);
  TORCH_CHECK(v.scalar_type() == t, "exp_avg_sq", where, " must have exp_avg's dtype ", t, ", got ",
              v.scalar_type());
}

// "[i]" for a foreach call, "" for a single-weight one (for messages)
inline std::string index_suffix(int64_t i, bool foreach) {
  return foreach ? "[" + std::to_string(i) + "]" : std::string();
}

// The per-weight numbers of a foreach call: a float64 CPU tensor of shape (count, >= columns).
inline void check_foreach_scalars(const at::Tensor& t, int64_t count, int64_t columns, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) == count &&
                  t.size(1) >= columns,
              name, " must be a float64 CPU tensor of shape (", count, ", ", columns, "), got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
}

// torch.amp.GradScaler's scale or overflow flag of a foreach call (grad_scale, found_inf):
// absent (then `absent` is returned), or a floating CPU tensor of exactly one element, whose
// value is read here on the host -- a CPU tensor, so no device sync.
inline double amp_scalar(const std::optional<at::Tensor>& t, const char* name, double absent) {
  if (!t.has_value()) return absent;
  TORCH_CHECK(t->numel() == 1 && t->is_floating_point(), name,
              " must be a floating tensor with exactly one element, got shape ", t->sizes(), " of ",
              t->scalar_type());
  check_cpu(*t, name);
  return t->item<double>();
}

// A symbol of the loaded libtorch_cpu or of a library it links (its BLAS), or nullptr.
inline void* torch_cpu_symbol(const char* name) {
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  return lib == nullptr ? nullptr : dlsym(lib, name);
}

// Makes the BLAS calls of the current thread single-threaded while it lives. Inside a
// parallel region BLAS is single-threaded anyway; a call too small to split runs on the
// calling thread, where MKL (which torch's x86 builds link) would thread even a 16 x 64 x 96
// GEMM: with 2 torch threads on a 2-core machine under a load of 18, one such torch.mm took
// 54 ms (the second thread waits for a core) against 0.01 ms on 1 thread. MKL's
// MKL_Set_Num_Threads_Local (the C entry; mkl_set_num_threads_local is the Fortran one, which
// takes a pointer) is looked up in the loaded libtorch_cpu at run time; where torch
// uses another BLAS it is absent and this does nothing.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : set_(setter()) {
    if (set_ != nullptr) previous_ = set_(1);
  }
  ~SingleThreadedBlas() {
    if (set_ != nullptr) set_(previous_);  // 0: back to the global setting
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  using Setter = int (*)(int);
  static Setter setter() {
    static const Setter found = reinterpret_cast<Setter>(torch_cpu_symbol("MKL_Set_Num_Threads_Local"));
    return found;
  }
  Setter set_;
  int previous_ = 0;
};

// A 2-D matrix as pointer + strides (in elements): T const for an operand, float for a result.
template <typename T>
struct Matrix {
  T* data;
  int64_t rows, cols, s0, s1;
  T* at(int64_t i, int64_t j) const { return data + i * s0 + j * s1; }
  Matrix block(int64_t i0, int64_t j0, int64_t h, int64_t w) const { return {at(i0, j0), h, w, s0, s1}; }
};

// C = alpha * A B + beta * C in fp32 (A: h x K, B: K x w, C: h x w; beta = 0 ignores C's old
// contents, NaN included, as BLAS does). The kernels' tile GEMMs are often tiny (64 x 96 at
// rank 16 is 0.1 M multiply-adds, a few us of math), and ATen's mm_out / addmm_ spent as much
// again on the views, dispatch and checks around each one; this calls the BLAS sgemm_ that
// torch links (looked up at run time in the loaded libtorch_cpu and its dependencies, as
// MKL_Set_Num_Threads_Local above) on the pointers. Where sgemm_ cannot take the operands (none
// found, a dimension or leading dimension over INT_MAX, an operand with no unit stride) it
// calls ATen's addmm_ on views of the same memory instead, which copies such an operand and
// calls the same sgemm_: the same product either way.
void gemm_f32(float alpha, const Matrix<const float>& A, const Matrix<const float>& B, float beta,
              const Matrix<float>& C);

// Copies a block into fp32 (16-bit values upcast exactly), row-major with leading dim `ld`.
template <typename T>
void copy_to_f32(const Matrix<const T>& src, float* dst, int64_t ld) {
  for (int64_t i = 0; i < src.rows; ++i) {
    const T* row = src.at(i, 0);
    float* out = dst + i * ld;
    if (src.s1 == 1) {
      for (int64_t j = 0; j < src.cols; ++j) out[j] = static_cast<float>(row[j]);
    } else {
      for (int64_t j = 0; j < src.cols; ++j) out[j] = static_cast<float>(row[j * src.s1]);
    }
  }
}

// A 2-D tensor in its storage dtype (fp32, bf16 or fp16) as untyped pointer + strides: what the
// kernels read and write, with no ATen op in their tile loops. `as<T>()` types it (T const to read).
struct StoredMatrix {
  void* data;
  at::ScalarType dtype;
  int64_t rows, cols, s0, s1;

  // a tensor the kernel writes
  static StoredMatrix of(const at::Tensor& t) {
    return {t.data_ptr(), t.scalar_type(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
  }
  // a tensor the kernel only reads (const_data_ptr: no copy-on-write storage is materialized)
  static StoredMatrix of_read_only(const at::Tensor& t) {
    return {const_cast<void*>(t.const_data_ptr()), t.scalar_type(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
  }
  StoredMatrix block(int64_t i0, int64_t j0, int64_t h, int64_t w) const {
    return {static_cast<char*>(data) + (i0 * s0 + j0 * s1) * static_cast<int64_t>(c10::elementSize(dtype)), dtype,
            h, w, s0, s1};
  }
  StoredMatrix t() const { return {data, dtype, cols, rows, s1, s0}; }
  template <typename T>
  Matrix<T> as() const {
    return {static_cast<T*>(data), rows, cols, s0, s1};
  }
  // copied into fp32 (16-bit values upcast exactly), row-major with leading dim ld
  void stage(float* dst, int64_t ld) const {
    if (dtype == at::kBFloat16) copy_to_f32(as<const c10::BFloat16>(), dst, ld);
    else if (dtype == at::kHalf) copy_to_f32(as<const c10::Half>(), dst, ld);
    else copy_to_f32(as<const float>(), dst, ld);
  }
};

// Splits items 0..n-1 (laid end to end, item i costing costs[i] > 0) across threads in
// contiguous runs of about equal total cost and calls body(begin, end) once per run.
// Only as many runs as give each at least `min_cost_per_run`: below that the fork and
// join of a parallel region (a few us, far more when the machine is loaded) costs more
// than the split saves, so a small call runs on the calling thread with no parallel region.
template <typename Body>
void parallel_over_items(const std::vector<int64_t>& costs, int64_t min_cost_per_run, const Body& body) {
  const int64_t n = static_cast<int64_t>(costs.size());
  if (n == 0) return;
  int64_t total = 0;
  for (int64_t c : costs) total += c;
  const int64_t runs = std::clamp<int64_t>(total / std::max<int64_t>(min_cost_per_run, 1), 1,
                                           std::min<int64_t>(at::get_num_threads(), n));
  if (runs == 1 || at::in_parallel_region()) {
    const SingleThreadedBlas one_blas_thread;
    body(int64_t{0}, n);
    return;
  }
  // item i goes to the run in whose share of the total cost its midpoint lies; that is
  // monotone in i, so each run is a contiguous range [bounds[k], bounds[k + 1])
  std::vector<int64_t> bounds(runs + 1, n);
  bounds[0] = 0;
  int64_t before = 0, run = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t owner = std::min<int64_t>(runs - 1, static_cast<int64_t>(
        (static_cast<double>(before) + 0.5 * costs[i]) * runs / static_cast<double>(total)));
    while (run < owner) bounds[++run] = i;
    before += costs[i];
  }
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (bounds[r] < bounds[r + 1]) body(bounds[r], bounds[r + 1]);
    }
  });
}

}  // namespace owlore
