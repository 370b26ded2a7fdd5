#include "cpu/multi_tensor.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace fused_optim::cpu {

Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if FO_X86_CLONES
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = Isa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
        best = Isa::kAvx512;
        if (__builtin_cpu_supports("avx512bf16")) best = Isa::kAvx512Bf16;
      }
    }
#endif
    const char* cap = std::getenv("FUSED_OPTIM_ISA");
    if (cap != nullptr && *cap != '\0') {
      const std::string c(cap);
      Isa limit = Isa::kAvx512Bf16;
      if (c == "baseline") {
        limit = Isa::kBaseline;
      } else if (c == "avx2") {
        limit = Isa::kAvx2;
      } else if (c == "avx512") {
        limit = Isa::kAvx512;
      } else {
        TORCH_CHECK(c == "avx512bf16",
                    "FUSED_OPTIM_ISA must be baseline, avx2, avx512 or avx512bf16, not ", c);
      }
      best = std::min(best, limit);
    }
    return best;
  }();
  return isa;
}

void run(MultiTensorPlan& plan, const std::vector<SegmentFn>& fns,
         const std::vector<const void*>& coeffs, double inv_grad_scale) {
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(fns.size()) == plan.size());
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(coeffs.size()) == plan.size());
  const int64_t entries = plan.num_entries();
  std::vector<SegmentFn> seg_fns(entries);
  std::vector<TensorPtrs*> ptrs(entries);
  for (int64_t j = 0; j < entries; ++j) {
    TensorPtrs& tp = plan.entry(j);
    tp.coeffs = coeffs[plan.entry_index(j)];
    tp.inv_grad_scale = inv_grad_scale;
    tp.next = j + 1 < entries ? &plan.entry(j + 1) : nullptr;
    tp.numel = plan.offsets()[j + 1] - plan.offsets()[j];
    seg_fns[j] = fns[plan.entry_index(j)];
    ptrs[j] = &tp;
  }
  const std::vector<int64_t>& offsets_ = plan.offsets();
  const int64_t total = plan.total_numel();
  // Note [one parallel region]
  // The elements of all tensors form one range, split evenly across threads whatever the
  // tensor sizes; each thread walks its tensors from the one holding its first element.
  // The math is elementwise and identical in vector body and tail, so the result is
  // bitwise the same for every thread count.
  at::parallel_for(0, total, kGrainSize, [&](int64_t begin, int64_t end) {
    auto it = std::upper_bound(offsets_.begin(), offsets_.end(), begin);
    size_t j = static_cast<size_t>(it - offsets_.begin()) - 1;
    while (begin < end) {
      const int64_t lo = begin - offsets_[j];
      const int64_t hi = std::min(end, offsets_[j + 1]) - offsets_[j];
      seg_fns[j](*ptrs[j], lo, hi);
      begin = offsets_[j] + hi;
      ++j;
    }
  });
  plan.finish();
}

}  // namespace fused_optim::cpu
