#pragma once
// HostMirror: one-element state lists that live on the params' GPU (as torch keeps them),
// worked on in CPU copies: read with one device-to-host copy, written back with one
// host-to-device copy. ASGD's eta and mu (asgd.cu) and NAdam's mu_product after a load
// (nadam.cu) use it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>

#include <optional>
#include <vector>

namespace fused_optim::cuda {

// Note [ASGD's scalar states on CUDA]
// torch keeps an ASGD param's step, eta and mu on the param's device (a checkpoint loaded
// with map_location="cpu" leaves its steps on the CPU and moves eta and mu to the GPU), and
// its for-loop (not capturable) reads them with .item(), computing the next eta and mu on
// the host in Python floats. The kernels compute them on the host too (Note [scalar
// states] in plan.h: asgd_step_coeffs), so a call takes those of its lists that live on
// the GPU to the host at once (one device-to-host copy of them all: one synchronisation,
// where the for-loop makes three a param), counts the step and computes the coefficients
// there exactly as for CPU params, so a CUDA step gives the CPU kernels' bits, and puts the
// new values back (one host-to-device copy, then one multi-tensor copy a list: W3's 5,000
// params took 54 us each with a copy kernel a scalar, on an H200). fused_optim.ASGD
// leaves capturable CUDA groups to torch's own step, and a call refuses graph capture.
struct HostMirror {
  std::vector<at::TensorList> lists;            // the device lists, in order
  std::vector<at::Tensor> hosts;                // per list: its values on the CPU, 1-D, in
                                                // its dtype (undefined: a list of mixed dtypes)
  std::vector<std::vector<at::Tensor>> copies;  // their CPU copies (same dtype and shape):
                                                // views of hosts[k] where it is defined

  // `ts` itself where it is not on `device` (its first entry decides), else its CPU copy,
  // made by read().
  at::TensorList add(const char* op, const char* name, at::TensorList ts,
                     std::optional<c10::Device> device) {
    if (!device.has_value() || ts.empty() || !ts[0].defined() || ts[0].device() != *device) {
      return ts;
    }
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      TORCH_CHECK(t.defined() && t.numel() == 1 && t.device() == *device && !t.is_complex(), op,
                  ": ", name, "[", i, "] must be a one-element real tensor on ", *device, " (as ",
                  name, "[0] is)");
    }
    lists.push_back(ts);
    copies.emplace_back();
    return at::TensorList();  // (replaced by copy(k) after read())
  }

  static bool one_dtype(at::TensorList ts) {
    for (const at::Tensor& t : ts) {
      if (t.scalar_type() != ts[0].scalar_type()) return false;
    }
    return true;
  }
  // A list's one-element tensors as 0-dim views (no copies), for stack and _foreach_copy_.
  static std::vector<at::Tensor> scalars(at::TensorList ts) {
    std::vector<at::Tensor> out;
    out.reserve(ts.size());
    for (const at::Tensor& t : ts) out.push_back(t.dim() == 0 ? t : t.squeeze());  // (numel 1: a 0-dim view)
    return out;
  }

  // Reads every added list's values with one device-to-host copy (exact through double: a
  // float of any width, or a step count), into CPU tensors of their dtypes and shapes. A
  // list of one dtype (as torch makes them) goes through one stack kernel and its copies
  // are views of one CPU tensor; a list of mixed dtypes, a conversion kernel a tensor.
  void read() {
    std::vector<at::Tensor> wide;
    for (at::TensorList ts : lists) {
      if (one_dtype(ts)) {
        wide.push_back(at::stack(scalars(ts)).to(at::kDouble));
      } else {
        for (const at::Tensor& t : ts) wide.push_back(t.reshape({1}).to(at::kDouble));
      }
    }
    if (wide.empty()) return;
    const at::Tensor values = at::cat(wide).cpu();  // the synchronisation
    int64_t offset = 0;
    for (size_t k = 0; k < lists.size(); ++k) {
      at::TensorList ts = lists[k];
      const int64_t n = static_cast<int64_t>(ts.size());
      if (one_dtype(ts)) {
        hosts.push_back(values.slice(0, offset, offset + n).to(ts[0].scalar_type()));  // exact
        std::vector<at::Tensor> views = hosts.back().unbind(0);
        for (int64_t i = 0; i < n; ++i) {
          copies[k].push_back(ts[i].dim() == 0 ? views[i] : views[i].view(ts[i].sizes()));
        }
      } else {
        hosts.emplace_back();
        const double* v = values.const_data_ptr<double>() + offset;
        for (const at::Tensor& t : ts) {
          at::Tensor h = at::empty(t.sizes(), t.options().device(at::kCPU));
          h.fill_(*v++);
          copies[k].push_back(std::move(h));
        }
      }
      offset += n;
    }
  }

  // Writes the CPU copies' values back (each one of its dtype's values: exact through
  // double) with one host-to-device copy; then a list of one dtype takes its values with
  // one conversion and one _foreach_copy_, a list of mixed dtypes with a copy a tensor.
  void write_back() const {
    std::vector<at::Tensor> wide;
    for (size_t k = 0; k < lists.size(); ++k) {
      if (hosts[k].defined()) {
        wide.push_back(hosts[k].to(at::kDouble));
      } else {
        for (const at::Tensor& h : copies[k]) wide.push_back(h.reshape({1}).to(at::kDouble));
      }
    }
    if (wide.empty()) return;
    // (from pageable memory: the copy is done when it returns)
    const at::Tensor on_device = at::cat(wide).to(lists[0][0].device());
    int64_t offset = 0;
    for (size_t k = 0; k < lists.size(); ++k) {
      at::TensorList ts = lists[k];
      const int64_t n = static_cast<int64_t>(ts.size());
      const at::Tensor mine = on_device.slice(0, offset, offset + n);
      if (hosts[k].defined()) {
        at::_foreach_copy_(scalars(ts), mine.to(ts[0].scalar_type()).unbind(0));
      } else {
        for (int64_t i = 0; i < n; ++i) ts[i].copy_(mine[i].reshape(ts[i].sizes()));
      }
      offset += n;
    }
  }
};

}  // namespace fused_optim::cuda
