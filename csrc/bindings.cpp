// Registrations of llp_fast._C. The ops are *declared* in Python (llp_fast/ops/*.py with
// torch.library.custom_op, whose default body is the reference at CompositeExplicitAutograd); this
// file only adds implementations for the CPU and CUDA dispatch keys, which take precedence over the
// default body for tensors on those devices. Loading the shared object is what registers them.
#include <Python.h>
#include <torch/library.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif
#ifndef TORCH_VERSION
#define TORCH_VERSION "unknown"
#endif

#include "llp_fast.h"

#ifdef LLP_FAST_WITH_CUDA
#define LLP_FAST_CUDA_FLAG "1"
#else
#define LLP_FAST_CUDA_FLAG "0"
#endif

// What this object was built against, readable from the file *without loading it* (llp_fast/_ext.py
// scans for it): loading runs the registrations below, which cannot be undone, so a stale build must
// be recognised before dlopen.
extern "C" __attribute__((used, visibility("default"))) const char llp_fast_build_info[] =
    "llp_fast-build:torch=" TORCH_VERSION ";cuda=" LLP_FAST_CUDA_FLAG ";";

TORCH_LIBRARY_IMPL(llp_fast, CPU, m) {
  m.impl("bank_update_", &llp_fast::bank_update_cpu);
  m.impl("topk_scores", &llp_fast::topk_scores_cpu);
  m.impl("aggregation_loss", &llp_fast::aggregation_loss_cpu);
  m.impl("aggregation_loss_backward", &llp_fast::aggregation_loss_backward_cpu);
  m.impl("vote", &llp_fast::vote_cpu);
}

#ifdef LLP_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(llp_fast, CUDA, m) { m.impl("bank_update_", &llp_fast::bank_update_cuda); }
#endif

// A plain CPython module (no pybind11: only cpu_paths is called through it, and it keeps the build
// short), so that the object is importable as llp_fast._C or, when JIT-built, under its own name.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define LLP_FAST_CAT2(a, b) a##b
#define LLP_FAST_CAT(a, b) LLP_FAST_CAT2(a, b)
#define LLP_FAST_STR2(a) #a
#define LLP_FAST_STR(a) LLP_FAST_STR2(a)

// cpu_paths() -> str: llp_fast::cpu_paths (csrc/llp_fast.h); a setting that names nothing raises
// ValueError with the kernels' message.
static PyObject* cpu_paths(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(llp_fast::cpu_paths().c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

static PyMethodDef methods[] = {
    {"cpu_paths", cpu_paths, METH_NOARGS, "Which CPU paths the kernels take here, in one line."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyMODINIT_FUNC LLP_FAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, LLP_FAST_STR(TORCH_EXTENSION_NAME),
                                   "llp_fast compiled kernels (registered with torch.library on import)",
                                   -1, methods};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", LLP_FAST_CUDA_FLAG[0] == '1') < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
