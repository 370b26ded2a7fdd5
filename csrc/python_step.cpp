// The Python module fused_optim._C: importing it loads this library, whose static
// initializers register the ops (csrc/ops.cpp) and their kernels; its functions are the
// optimizers' eager fast path (Note [direct calls] in direct_call.h).

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <string>
#include <vector>

#include "direct_call.h"

namespace fused_optim {
namespace {

// at::Tensor handles that alias tensors owned by Python objects without touching their
// reference counts (Note [no tensor copies] in cpu/multi_tensor.cpp). They are valid
// while the Python objects live: the param group and the state dict the caller passed
// hold them for the whole call.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (auto& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void reserve(size_t n) { tensors_.reserve(n); }
  void push(const at::Tensor& t) {
    tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
  }
  bool empty() const { return tensors_.empty(); }
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// A dense CPU tensor with nothing in between it and its memory: no tensor subclass, no
// functorch or functionalization wrapper, no conjugate or negative bit, no sparse
// layout. Anything else takes the dispatcher path, which handles it as before.
bool is_plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet plain{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                         c10::DispatchKey::AutogradCPU,
                                         c10::DispatchKey::AutocastCPU};
  return plain.isSupersetOf(t.key_set()) && t.layout() == at::kStrided;
}

// The tensor a Python object holds if it is a plain Tensor or Parameter (not a subclass)
// holding a plain CPU tensor; nullptr otherwise.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return is_plain_cpu(t) ? &t : nullptr;
}

// _step(op, params, state, keys, args) -> bool
//
// One param group's step through the CPU kernel registered as `op`, if this path can
// take it: `params` is the group's list, `state` the optimizer's state dict, `keys` the
// state key of each list the kernel takes after params and grads (None: an empty list),
// `args` the kernel's other arguments in schema order. Params without a grad are left
// out, as in torch.optim. Returns False, having changed nothing, when any param, grad or
// state entry is not a plain CPU tensor, when a state entry is missing (the Python
// path creates the state), or when a torch function or dispatch mode is active (they
// must see the op): the caller then takes the dispatcher path.
PyObject* py_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 5, "_step expects 5 arguments, got ", nargs);
  PyObject* op = args[0];
  PyObject* params = args[1];
  PyObject* state = args[2];
  PyObject* keys = args[3];
  PyObject* rest = args[4];
  TORCH_CHECK_TYPE(PyUnicode_Check(op) && PyList_Check(params) && PyDict_Check(state) &&
                       PyTuple_Check(keys) && PyTuple_Check(rest),
                   "_step expects (str, list, dict, tuple, tuple)");
  const std::string name = PyUnicode_AsUTF8(op);
  const DirectFn kernel = find_direct_call(name);
  TORCH_CHECK(kernel != nullptr, "_step: no CPU kernel registered as ", name);
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_FALSE;
  }

  const Py_ssize_t n = PyList_GET_SIZE(params);
  const Py_ssize_t num_keys = PyTuple_GET_SIZE(keys);
  std::vector<BorrowedTensors> lists(static_cast<size_t>(2 + num_keys));
  for (auto& l : lists) l.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    const at::Tensor* p = plain_tensor(obj);
    if (p == nullptr) Py_RETURN_FALSE;
    const at::Tensor& g = p->grad();
    if (!g.defined()) continue;
    if (!is_plain_cpu(g)) Py_RETURN_FALSE;
    lists[0].push(*p);
    lists[1].push(g);
    PyObject* param_state = nullptr;  // borrowed; looked up once a key needs it
    for (Py_ssize_t k = 0; k < num_keys; ++k) {
      PyObject* key = PyTuple_GET_ITEM(keys, k);
      if (key == Py_None) continue;
      if (param_state == nullptr) {
        param_state = PyDict_GetItemWithError(state, obj);
        if (param_state == nullptr && PyErr_Occurred()) return nullptr;
        if (param_state == nullptr || !PyDict_Check(param_state)) Py_RETURN_FALSE;
      }
      PyObject* value = PyDict_GetItemWithError(param_state, key);  // borrowed
      if (value == nullptr && PyErr_Occurred()) return nullptr;
      const at::Tensor* s = value == nullptr ? nullptr : plain_tensor(value);
      if (s == nullptr) Py_RETURN_FALSE;
      lists[static_cast<size_t>(2 + k)].push(*s);
    }
  }
  if (lists[0].empty()) Py_RETURN_TRUE;

  DirectCall call;
  for (const auto& l : lists) call.lists.push_back(l.list());
  for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(rest); ++j) {
    PyObject* a = PyTuple_GET_ITEM(rest, j);
    if (a == Py_None) {
      call.tensors.emplace_back(std::nullopt);
    } else if (THPVariable_Check(a)) {
      call.tensors.emplace_back(THPVariable_Unpack(a));
    } else {
      const double v = PyFloat_AsDouble(a);
      if (v == -1.0 && PyErr_Occurred()) return nullptr;
      call.numbers.push_back(v);
    }
  }
  {
    // As a torch op: the GIL is released while the kernel runs, and a profiler sees it.
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("fused_optim::" + name, std::vector<c10::IValue>());
    kernel(call);
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// _has_sparse_grad(params) -> bool: whether a tensor of the list has a sparse grad.
PyObject* py_has_sparse_grad(PyObject* /*module*/, PyObject* params) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyList_Check(params), "_has_sparse_grad expects a list");
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(obj)) continue;
    const at::Tensor& g = THPVariable_Unpack(obj).grad();
    if (g.defined() && g.is_sparse()) Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_step)),
     METH_FASTCALL, "One param group's step through a CPU kernel (Note [direct calls])."},
    {"_has_sparse_grad", py_has_sparse_grad, METH_O,
     "Whether a tensor of the list has a sparse grad."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fused_optim

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          fused_optim::methods};
  return PyModule_Create(&module_def);
}
