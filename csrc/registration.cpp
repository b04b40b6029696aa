// CPU kernels of the ops defined in owlore_kernels/ops (torch.library.define in Python).
// Loading this library (import owlore_kernels._C) registers them with torch's
// dispatcher, which then runs them for CPU tensors.
#include <Python.h>
#include <torch/library.h>

#include "owlore.h"

TORCH_LIBRARY_IMPL(owlore, CPU, m) {
  m.impl("outlier_count", &owlore::outlier_count);
  m.impl("project_adam_", &owlore::project_adam_);
  m.impl("back_project_update_", &owlore::back_project_update_);
  m.impl("project_adam_foreach_", &owlore::project_adam_foreach_);
  m.impl("back_project_update_foreach_", &owlore::back_project_update_foreach_);
  m.impl("adamw_foreach_", &owlore::adamw_foreach_);
}

// A Python module with no functions: importing it loads this library, whose
// static initialisers above register the kernels.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "owlore-kernels CPU kernels of torch.ops.owlore.*", -1, nullptr,
  };
  return PyModule_Create(&module);
}
