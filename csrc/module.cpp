// Makes pclr._C importable as a Python module. The ops themselves are registered with the dispatcher by static
// initialisers in ops.cpp (TORCH_LIBRARY_FRAGMENT) when the library is loaded; Python reaches them as
// torch.ops.pclr.*, so the module needs no Python bindings of its own.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pclr CUDA kernels (ops in torch.ops.pclr)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
