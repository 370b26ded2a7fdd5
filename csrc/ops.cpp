// Every schema of the library, in one place. Kernels register per device in
// csrc/cpu/*.cpp (and csrc/cuda/*.cu); fake kernels for torch.compile live in
// fused_optim/_ops.py; the Python module _C is in csrc/python_step.cpp.
//
// Note [schemas]
// Each list a kernel writes is annotated (Tensor(a!)[]): params, the optimizer state and
// the step counters always; grads too, because with a GradScaler the kernel stores the
// unscaled grad back, as torch's for-loop (GradScaler.unscale_) and fused paths leave it.
// Hyper-parameters are doubles; `lr_tensor` carries a Tensor lr (then `lr` is ignored).
// The elementwise algorithms end with `param_mode` and `param_aux`: how 16-bit params are
// kept between steps (Note [param storage] in plan.h; 0 and None: round to nearest).

#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/multi_tensor.h"

TORCH_LIBRARY(fused_optim, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool is_first_step, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] state_steps, "
      "float lr, float alpha, float eps, float weight_decay, float momentum, bool centered, "
      "bool maximize, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] state_steps, float lr, float lr_decay, float weight_decay, float eps, "
      "bool maximize, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "adamax_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_infs, Tensor(e!)[] state_steps, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool maximize, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "adadelta_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] acc_deltas, Tensor(e!)[] state_steps, float lr, float rho, float eps, "
      "float weight_decay, bool maximize, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "nadam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] mu_products, Tensor(f!)[] state_steps, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, "
      "float momentum_decay, bool decoupled_weight_decay, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "radam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] state_steps, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool decoupled_weight_decay, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  // (Rprop's lr is only its initial step size, made with the state: no lr argument.)
  m.def(
      "rprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] prevs, "
      "Tensor(d!)[] step_sizes, Tensor(e!)[] state_steps, float etaminus, float etaplus, "
      "float step_size_min, float step_size_max, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  m.def(
      "asgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] axs, Tensor(d!)[] mus, "
      "Tensor(e!)[] etas, Tensor(f!)[] state_steps, float lr, float lambd, float alpha, "
      "float t0, float weight_decay, bool maximize, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, int param_mode=0, "
      "Tensor(z!)[]? param_aux=None) -> ()");
  // SparseAdam: the step sizes are computed per param on the host from torch's Python-int
  // steps (Note [sparse adam] in update_rules.h); grads are written when a GradScaler's
  // scale is given (their values unscaled in place, as GradScaler.unscale_ leaves them).
  m.def(
      "sparse_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, float[] step_sizes, float beta1, float beta2, float eps, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adafactor (csrc/cpu/adafactor.cpp): row_vars and col_vars hold the state of the params
  // of 2+ dims, variances that of the others, each in the params' order. eps1=None is
  // torch.finfo(dtype).eps of the first param, as in torch's for-loop.
  m.def(
      "adafactor_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] row_vars, "
      "Tensor(d!)[] col_vars, Tensor(e!)[] variances, Tensor(f!)[] state_steps, float lr, "
      "float beta2_decay, float? eps1, float eps2, float d, float weight_decay, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Muon (csrc/cpu/muon.cpp): not elementwise; the Newton-Schulz coefficients are a, b, c;
  // adjust_lr 0 is torch's None or "original", 1 "match_rms_adamw", 2 no adjustment, 3
  // "spectral_unclamped" (fused_optim/muon.py); normalize_buffer: whether a bfloat16 momentum
  // buffer is normalized in place when nesterov is off, as torch before 2.15 did (Note [Muon's
  // bfloat16 buffer] in csrc/cpu/muon.cpp).
  // _muon_aten_: the same step through ATen ops only (CUDA's kernel), on any device.
  m.def(
      "muon_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "float lr, float weight_decay, float momentum, bool nesterov, float ns_a, float ns_b, "
      "float ns_c, float eps, int ns_steps, int adjust_lr, bool normalize_buffer, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "_muon_aten_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "float lr, float weight_decay, float momentum, bool nesterov, float ns_a, float ns_b, "
      "float ns_c, float eps, int ns_steps, int adjust_lr, bool normalize_buffer, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Gradient clipping by global norm (csrc/cpu/grad_norm.cpp, fused_optim/clip.py): each
  // tensor's norm (ord 2 or inf) as torch.linalg.vector_norm computes it, of the tensors
  // times inv_scale (a GradScaler's unscale); and tensors *= scalar.
  m.def("_norms(Tensor[] tensors, float ord, float inv_scale=1.0) -> Tensor");
  m.def("_mul_(Tensor(a!)[] tensors, Tensor scalar) -> ()");
  // Benchmark helper: streams memory with a given read/write pattern, to measure the
  // bandwidth limit an optimizer step can reach (see benchmarks/).
  m.def("_stream_(Tensor(a!)[] inout, Tensor[] read_only, float scale) -> ()");
  // Tensors like the given CPU tensors (their copies, or zeros) side by side in one
  // allocation, each with a storage of its own (csrc/cpu/adjacent.cpp; Note [small states
  // side by side] in fused_optim/optimizer.py).
  m.def("_side_by_side(Tensor[] like, bool copy) -> Tensor[]");
  // How many threads one of our parallel regions really uses over n elements (a build
  // check: at::parallel_for silently runs serially in code compiled without OpenMP).
  m.def("_parallel_workers(int n) -> int", [](int64_t n) {
    std::vector<char> used(static_cast<size_t>(std::max(1, at::get_num_threads())), 0);
    at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
      const int t = at::get_thread_num();
      if (t >= 0 && static_cast<size_t>(t) < used.size()) used[static_cast<size_t>(t)] = 1;
    });
    return static_cast<int64_t>(std::count(used.begin(), used.end(), 1));
  });
  // The CPU tuning in force (Note [CPU tuning]): for benchmark reports and tests.
  m.def("_cpu_tuning() -> str", [] {
    const auto& t = fused_optim::cpu::cpu_tuning();
    using FloatLoops = fused_optim::cpu::CpuTuning::FloatLoops;
    return std::string("prefetch ") +
           (t.prefetch_ahead > 0 ? std::to_string(t.prefetch_ahead) : std::string("off")) +
           (t.gather_prefetch ? "" : ", gather prefetch off") +
           (t.q8_arithmetic ? ", 8-bit codes by arithmetic" : "") +
           (t.float_loops == FloatLoops::kAvx2            ? ", float loops in AVX2"
            : t.float_loops == FloatLoops::kAvx2LoadBound ? ", load-bound float loops in AVX2"
                                                          : "") +
           " (" + t.cpu + ", " +
           t.source + ")";
  });
  // Sets the CPU tuning inside this process (cpu/tuning.h's set_cpu_tuning): for
  // benchmarks that time the choices in the same rounds (bench.py --tuning).
  m.def("_set_cpu_tuning(str[] settings) -> ()",
        [](std::vector<std::string> settings) { fused_optim::cpu::set_cpu_tuning(settings); });
  // Which copy of the CPU loops runs here (Note [ISA dispatch]): for benchmark reports.
  m.def("_cpu_isa() -> str", [] {
    switch (fused_optim::cpu::cpu_isa()) {
      case fused_optim::cpu::Isa::kAvx512Bf16: return std::string("avx512bf16");
      case fused_optim::cpu::Isa::kAvx512: return std::string("avx512");
      case fused_optim::cpu::Isa::kAvx2: return std::string("avx2");
      default: return std::string("baseline");
    }
  });
}
