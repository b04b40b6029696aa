// Plain (non-GaLore) AdamW over a list of weights, elementwise. Per element, with
// (c0, c1, c2) the weight's row of coefficients and g the grad in the math type
// (fp32; fp64 for fp64 weights and moments), in this order:
//   m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g g
//   variant "galore": w = w + c0 m / (sqrt(v) + eps);  if c1 != 0: w = w + c1 w
//   variant "torch":  w = w c1;  w = w + c0 m / (sqrt(v) / c2 + eps)
// W is stored back in its own dtype, bf16 moments too, rounded to nearest even (the
// c10::BFloat16 / c10::Half conversions). See owlore_kernels/ops/adamw.py.
// torch.amp.GradScaler's scale and overflow flag (one-element CPU tensors, read on the
// host): with grad_scale, g = g / grad_scale in the math type before the moments; a
// nonzero found_inf returns after the checks, before anything is written.
//
// Each weight is read in memory order when its four tensors have one layout without
// gaps (contiguous, or the same permuted strides: a transposed weight and the grad and
// moments made like it); any other weight goes through contiguous copies that are
// written back afterwards. The elements of all weights are cut into chunks laid end to
// end and split across threads by count (parallel_over_items in owlore.h).
#include "owlore.h"

#include <cmath>

namespace owlore {
namespace {

// Chunk of one weight per work item: 16K elements is 64 KB of each fp32 array, a few us
// of work, so a 1-element weight and a 100M-element one both split well.
constexpr int64_t kChunk = 1 << 14;
// Below this many elements per thread a call runs on one thread: 256K elements take
// ~1 ms or more on one thread (224 weights of 6144 elements took 23 ns per element on a
// loaded 2-core AMD EPYC; a few ns on a quiet core, estimated), far over the fork and join
// of a parallel region on a quiet machine (a few us; estimated, not measured here).
constexpr int64_t kMinElemsPerRun = 1 << 18;

struct Coefficients {
  double c0, c1, c2;
};

struct Weight {
  at::Tensor param, grad, exp_avg, exp_avg_sq;  // the tensors updated: the caller's, or contiguous copies
  at::Tensor param_out, exp_avg_out, exp_avg_sq_out;  // where copies are written back (undefined: none)
  Coefficients c;
};

// beta1, beta2 and eps come as doubles: 1 - beta is formed in double and then rounded, as
// the reference does (1 - float(0.999) would be off by 1.3e-5 relative).
// The numbers of a call that every weight shares.
struct CallScalars {
  double beta1, beta2, eps;
  bool scaled;        // a grad_scale was given
  double grad_scale;  // its value (unused when !scaled)
};

template <typename param_t, typename state_t, typename math_t, bool kGalore>
void update_range(const Weight& w, int64_t begin, int64_t end, const CallScalars& call) {
  const double beta1_in = call.beta1, beta2_in = call.beta2, eps_in = call.eps;
  param_t* p = w.param.data_ptr<param_t>();
  const param_t* g = w.grad.const_data_ptr<param_t>();
  state_t* m = w.exp_avg.data_ptr<state_t>();
  state_t* v = w.exp_avg_sq.data_ptr<state_t>();
  const math_t beta1 = static_cast<math_t>(beta1_in), beta2 = static_cast<math_t>(beta2_in);
  const math_t omb1 = static_cast<math_t>(1.0 - beta1_in), omb2 = static_cast<math_t>(1.0 - beta2_in);
  const math_t eps = static_cast<math_t>(eps_in);
  const math_t c0 = static_cast<math_t>(w.c.c0), c1 = static_cast<math_t>(w.c.c1), c2 = static_cast<math_t>(w.c.c2);
  const bool decay = w.c.c1 != 0.0;
  const bool scaled = call.scaled;
  // the scale rounded to the math type (an fp32 scale is exact in both), then one IEEE division
  const math_t scale = static_cast<math_t>(call.grad_scale);
  for (int64_t e = begin; e < end; ++e) {
    const math_t gi = scaled ? static_cast<math_t>(g[e]) / scale : static_cast<math_t>(g[e]);
    const math_t mi = beta1 * static_cast<math_t>(m[e]) + omb1 * gi;
    const math_t vi = beta2 * static_cast<math_t>(v[e]) + omb2 * gi * gi;
    math_t wi = static_cast<math_t>(p[e]);
    if constexpr (kGalore) {
      wi = wi + c0 * mi / (std::sqrt(vi) + eps);
      if (decay) wi = wi + c1 * wi;
    } else {
      wi = wi * c1;
      wi = wi + c0 * mi / (std::sqrt(vi) / c2 + eps);
    }
    m[e] = static_cast<state_t>(mi);
    v[e] = static_cast<state_t>(vi);
    p[e] = static_cast<param_t>(wi);
  }
}

using RangeFn = void (*)(const Weight&, int64_t, int64_t, const CallScalars&);

template <bool kGalore>
RangeFn range_fn(at::ScalarType param, at::ScalarType state) {
  using BF = c10::BFloat16;
  using H = c10::Half;
  if (param == at::kDouble) return &update_range<double, double, double, kGalore>;
  if (state == at::kBFloat16) {
    if (param == at::kFloat) return &update_range<float, BF, float, kGalore>;
    if (param == at::kBFloat16) return &update_range<BF, BF, float, kGalore>;
    return &update_range<H, BF, float, kGalore>;
  }
  if (param == at::kFloat) return &update_range<float, float, float, kGalore>;
  if (param == at::kBFloat16) return &update_range<BF, float, float, kGalore>;
  return &update_range<H, float, float, kGalore>;
}

// One memory order for the four tensors: no gaps, no overlap, the same strides.
bool same_dense_layout(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v) {
  if (!p.is_non_overlapping_and_dense()) return false;
  for (const at::Tensor* t : {&g, &m, &v})
    if (!t->is_non_overlapping_and_dense() || t->strides() != p.strides()) return false;
  return true;
}

Weight checked_weight(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const Coefficients& c, int64_t i) {
  const std::string where = index_suffix(i, true);
  check_cpu(param, "params", where);
  const auto dtype = param.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || is_16bit(dtype), "params", where,
              " must be float32, float64, bfloat16 or float16, got ", dtype);
  check_cpu_dtype(grad, dtype, "grads", where);
  check_cpu_moments(exp_avg, exp_avg_sq, "s" + where, /*allow_fp64=*/dtype == at::kDouble);
  TORCH_CHECK((dtype == at::kDouble) == (exp_avg.scalar_type() == at::kDouble), "adamw_foreach_: exp_avgs", where,
              " must be float64 exactly when params", where, " is");
  for (const at::Tensor* t : {&grad, &exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->sizes() == param.sizes(), "adamw_foreach_: grads, exp_avgs and exp_avg_sqs", where,
                " must have the shape of params", where, " ", param.sizes(), ", got ", t->sizes());
  // detach: the updates are not differentiable (param is usually a leaf that requires grad)
  Weight w{param.detach(), grad.detach(), exp_avg.detach(), exp_avg_sq.detach(), {}, {}, {}, c};
  if (!same_dense_layout(w.param, w.grad, w.exp_avg, w.exp_avg_sq)) {
    // update contiguous copies, written back after the update (only odd layouts pay this)
    w.param_out = w.param;
    w.exp_avg_out = w.exp_avg;
    w.exp_avg_sq_out = w.exp_avg_sq;
    w.param = w.param.contiguous();
    w.grad = w.grad.contiguous();
    w.exp_avg = w.exp_avg.contiguous();
    w.exp_avg_sq = w.exp_avg_sq.contiguous();
  }
  return w;
}

}  // namespace

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
    const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(variant == "galore" || variant == "torch", "variant must be 'galore' or 'torch', got '",
              std::string(variant), "'");
  const bool galore = variant == "galore";
  const int64_t count = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size(),
              "adamw_foreach_: the lists must have one tensor per weight, got ", params.size(), ", ", grads.size(),
              ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  check_foreach_scalars(coefficients, count, galore ? 2 : 3, "coefficients");
  const double scale = amp_scalar(grad_scale, "grad_scale", 1.0);
  const double found = amp_scalar(found_inf, "found_inf", 0.0);
  const auto c = coefficients.accessor<double, 2>();
  // every weight is checked (and any odd layout copied) before the first one is written
  std::vector<Weight> weights;
  std::vector<RangeFn> fns;
  weights.reserve(count);
  fns.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const Coefficients ci{c[i][0], c[i][1], coefficients.size(1) > 2 ? c[i][2] : 1.0};
    weights.push_back(checked_weight(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], ci, i));
    const auto ptype = weights.back().param.scalar_type(), stype = weights.back().exp_avg.scalar_type();
    fns.push_back(galore ? range_fn<true>(ptype, stype) : range_fn<false>(ptype, stype));
  }
  if (found != 0.0) return;  // an overflowed step (NaN counts): write nothing (copies of odd layouts are private)
  const CallScalars call{beta1, beta2, eps, grad_scale.has_value(), scale};
  std::vector<int64_t> costs, weight_of, start_of;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t numel = weights[i].param.numel();
    for (int64_t s = 0; s < numel; s += kChunk) {
      costs.push_back(std::min(kChunk, numel - s));
      weight_of.push_back(i);
      start_of.push_back(s);
    }
  }
  // no ATen calls inside: plain loops over pointers, so no thread-local state to carry
  parallel_over_items(costs, kMinElemsPerRun, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = weight_of[item];
      fns[i](weights[i], start_of[item], start_of[item] + costs[item], call);
    }
  });
  for (const Weight& w : weights) {
    if (!w.param_out.defined()) continue;
    w.param_out.copy_(w.param);
    w.exp_avg_out.copy_(w.exp_avg);
    w.exp_avg_sq_out.copy_(w.exp_avg_sq);
  }
}

}  // namespace owlore
