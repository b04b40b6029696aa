// Shared declarations for the C++ CPU backend of owlore-kernels.
//
// Each op is defined once, in Python (owlore_kernels/ops/*.py: schema, argument
// checks, pure-torch reference); registration.cpp registers these functions as
// its CPU kernels. The TORCH_CHECKs here only guard memory safety (dtype, device,
// shapes) for direct callers of torch.ops.owlore.*; the argument checks with the
// user-facing messages run once, in Python.
//
// Threading: the outer tile loops use at::parallel_for (torch's own OpenMP
// runtime; setup.py links the same libgomp that torch ships). BLAS calls made
// inside a parallel region run single-threaded, so each thread owns whole tiles
// and there is no synchronisation per tile. Worker threads do not inherit the
// caller's thread-local state (grad mode, inference mode), so the tile loops
// restore it with at::ThreadLocalStateGuard before calling ATen ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

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

inline void check_cpu_float(const at::Tensor& t, const char* name, bool fp32_only) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  if (fp32_only) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace owlore
