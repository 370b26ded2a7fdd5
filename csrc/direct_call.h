#pragma once
// Note [direct calls]
// The optimizers' eager steps call the kernels without the dispatcher. Through
// torch.ops, each tensor of each list is boxed into an IValue and copied twice, and a
// copy of a tensor that Python owns increfs its PyObject (the copy's destructor takes
// the GIL to decref it): on a step over 5,000 small tensors that costs more than the
// update itself. csrc/python_step.cpp instead gathers the lists straight from the
// param group and the optimizer state, as at::Tensor handles that borrow Python's
// references, and calls the kernel registered here under the op's name: the same
// function the dispatcher calls, with the same arguments in schema order, so both ways
// run the same checks, the same math and raise the same errors.
//
// A kernel registers itself next to its TORCH_LIBRARY_IMPL, the CUDA one under the op's
// name + "@cuda" (python_step.cpp picks it for a group on one GPU):
//   FO_REGISTER_DIRECT_CALL("adam_", adam_cpu);
//   FO_REGISTER_DIRECT_CALL("adam_@cuda", adam_cuda);

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace fused_optim {

// One kernel call's arguments, by kind, each kind in schema order: the tensor lists,
// the float, int and bool arguments (as doubles), and the optional tensors.
struct DirectCall {
  std::vector<at::TensorList> lists;
  std::vector<double> numbers;
  std::vector<std::optional<at::Tensor>> tensors;
};

using DirectFn = void (*)(const DirectCall&);

// A registered kernel, and the kind of each of its arguments after the tensor lists, in
// schema order: 'n' a number (float, int or bool), 't' an optional tensor.
struct DirectKernel {
  DirectFn fn = nullptr;
  size_t num_lists = 0;           // required tensor lists
  size_t num_optional_lists = 0;  // after them: optional ones (param_aux)
  std::string arg_kinds;
};

namespace detail {

struct Cursor {
  size_t list = 0, number = 0, tensor = 0;
};

template <typename A>
struct DirectArg;
template <>
struct DirectArg<at::TensorList> {
  static at::TensorList get(const DirectCall& c, Cursor& k) { return c.lists[k.list++]; }
};
// An optional list (param_aux): the next list where the caller gave one more than the
// required lists, else none (callers that know nothing of it leave it out).
template <>
struct DirectArg<std::optional<at::TensorList>> {
  static std::optional<at::TensorList> get(const DirectCall& c, Cursor& k) {
    if (k.list < c.lists.size()) return c.lists[k.list++];
    return std::nullopt;
  }
};
template <>
struct DirectArg<double> {
  static double get(const DirectCall& c, Cursor& k) { return c.numbers[k.number++]; }
};
template <>
struct DirectArg<int64_t> {
  static int64_t get(const DirectCall& c, Cursor& k) {
    return static_cast<int64_t>(c.numbers[k.number++]);
  }
};
template <>
struct DirectArg<bool> {
  static bool get(const DirectCall& c, Cursor& k) { return c.numbers[k.number++] != 0.0; }
};
template <>
struct DirectArg<std::optional<at::Tensor>> {
  static const std::optional<at::Tensor>& get(const DirectCall& c, Cursor& k) {
    return c.tensors[k.tensor++];
  }
};

template <typename A, typename Kind>
constexpr size_t count_of() {
  return std::is_same_v<std::decay_t<A>, Kind> ? 1 : 0;
}

template <typename... A>
void call_with(void (*fn)(A...), const char* name, const DirectCall& c) {
  constexpr size_t lists = (count_of<A, at::TensorList>() + ...);
  constexpr size_t optional_lists = (count_of<A, std::optional<at::TensorList>>() + ...);
  constexpr size_t numbers = (count_of<A, double>() + ...) + (count_of<A, bool>() + ...) +
                             (count_of<A, int64_t>() + ...);
  constexpr size_t tensors = (count_of<A, std::optional<at::Tensor>>() + ...);
  TORCH_CHECK(c.lists.size() >= lists && c.lists.size() <= lists + optional_lists &&
                  c.numbers.size() == numbers && c.tensors.size() == tensors,
              "fused_optim::", name, ": expected ", lists, " tensor lists, ", numbers,
              " numbers and ", tensors, " optional tensors, got ", c.lists.size(), ", ",
              c.numbers.size(), " and ", c.tensors.size());
  Cursor k;
  // A braced list is evaluated left to right: the arguments are taken in schema order.
  std::tuple<A...> args{DirectArg<std::decay_t<A>>::get(c, k)...};
  std::apply(fn, args);
}

template <typename... A>
DirectKernel describe(void (*)(A...), DirectFn fn) {
  DirectKernel k;
  k.fn = fn;
  k.num_lists = (count_of<A, at::TensorList>() + ...);
  k.num_optional_lists = (count_of<A, std::optional<at::TensorList>>() + ...);
  (void)std::initializer_list<int>{
      (count_of<A, at::TensorList>() + count_of<A, std::optional<at::TensorList>>() ? 0
                                     : (k.arg_kinds += count_of<A, std::optional<at::Tensor>>() ? 't' : 'n', 0))...};
  return k;
}

}  // namespace detail

// The registered kernels, by op name (without the namespace).
inline std::unordered_map<std::string, DirectKernel>& direct_calls() {
  static std::unordered_map<std::string, DirectKernel> registry;
  return registry;
}

inline bool register_direct_call(const char* name, DirectKernel kernel) {
  direct_calls().emplace(name, std::move(kernel));
  return true;
}

inline const DirectKernel* find_direct_call(const std::string& name) {
  const auto it = direct_calls().find(name);
  return it == direct_calls().end() ? nullptr : &it->second;
}

}  // namespace fused_optim

#define FO_DIRECT_CONCAT_(a, b) a##b
#define FO_DIRECT_CONCAT(a, b) FO_DIRECT_CONCAT_(a, b)
#define FO_REGISTER_DIRECT_CALL(name, kernel)                                      \
  static const bool FO_DIRECT_CONCAT(fo_direct_call_, __LINE__) =                  \
      ::fused_optim::register_direct_call(                                         \
          name, ::fused_optim::detail::describe(                                   \
                    &kernel, [](const ::fused_optim::DirectCall& c) {              \
                      ::fused_optim::detail::call_with(&kernel, name, c);          \
                    }))
