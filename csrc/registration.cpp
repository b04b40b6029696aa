// The one definition of each op (its schema) and its CPU implementation.
//
// Python reaches them as torch.ops.owlore.<name> once owlore_kernels._C is
// imported; owlore_kernels/ops/_cpp.py wraps them with the same positional
// signatures as the torch references in owlore_kernels/ops/*.py.
#include <Python.h>
#include <torch/library.h>

#include "owlore.h"

TORCH_LIBRARY(owlore, m) {
  // (mean, count): mean of |w| (or |w_ij| * s_j) over all entries of all tensors,
  // and the number of entries whose score exceeds threshold * mean.
  m.def("outlier_count(Tensor[] tensors, float threshold, Tensor?[] col_scales) -> (float, int)");
  // R = P^T G (left) or G Q^T (right); Adam moments updated in place;
  // N = (m / bias_correction1) / (sqrt(v / bias_correction2) + eps) written to out.
  m.def(
      "project_adam_(Tensor grad, Tensor proj, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor(c!) out, "
      "str side, float beta1, float beta2, float eps, float bias_correction1, float bias_correction2) -> ()");
  // W <- beta * W + alpha * (P N) (left) or (N Q) (right), in place.
  m.def("back_project_update_(Tensor(a!) param, Tensor proj, Tensor norm_update, str side, float beta, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(owlore, CPU, m) {
  m.impl("outlier_count", &owlore::outlier_count);
  m.impl("project_adam_", &owlore::project_adam_);
  m.impl("back_project_update_", &owlore::back_project_update_);
}

// A Python module with no functions: importing it loads this library, whose
// static initialisers above register the ops with torch's dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "owlore-kernels C++ CPU ops (torch.ops.owlore.*)", -1, nullptr,
  };
  return PyModule_Create(&module);
}
