#include "cpu/multi_tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace fused_optim::cpu {
namespace {

// The value of an environment variable that overrides a choice made per machine, or
// nullopt where it is unset, empty or "auto" (the machine's own choice stands).
std::optional<std::string> env_choice(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0' || std::string(value) == "auto") return std::nullopt;
  return std::string(value);
}

}  // namespace

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
    if (const auto cap = env_choice("FUSED_OPTIM_ISA")) {
      const std::string& c = *cap;
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

namespace {

// The CPU, as far as the tuning table needs it: vendor, family and model from CPUID.
struct CpuId {
  std::string vendor;
  unsigned family = 0, model = 0;
};

CpuId read_cpuid() {
  CpuId id;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    char v[13];
    std::memcpy(v, &b, 4);
    std::memcpy(v + 4, &d, 4);
    std::memcpy(v + 8, &c, 4);
    v[12] = '\0';
    id.vendor = v;
  }
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    const unsigned base_family = (a >> 8) & 0xF, base_model = (a >> 4) & 0xF;
    id.family = base_family == 0xF ? base_family + ((a >> 20) & 0xFF) : base_family;
    id.model = (base_family == 0x6 || base_family == 0xF) ? (((a >> 16) & 0xF) << 4) | base_model
                                                          : base_model;
  }
#endif
  return id;
}

// Note [CPU tuning]'s table: what was measured where. Distances are in elements of float.
CpuTuning tuning_from_table() {
  const CpuId id = read_cpuid();
  CpuTuning t{0, true, "unknown CPU", "default"};
#if FO_X86_CLONES
  if (id.vendor == "GenuineIntel" && __builtin_cpu_supports("avx512bf16")) {
    // The project's 2-core Xeon (Cooper Lake or newer server cores): fp32 Adam 87% -> 95%
    // of the limit, W3 Adam ~12% faster at 2 threads (sessions 5-7).
    t = {384, true, "Intel Xeon with AVX512-BF16", "table"};
  } else if (id.vendor == "AuthenticAMD" && id.family == 0x19 &&
             ((id.model >= 0x10 && id.model <= 0x1F) || (id.model >= 0x60 && id.model <= 0xAF))) {
    // A 2-core AMD EPYC (Zen 4, family 19h model 11h): with the Xeon's prefetch, fp32 Adam
    // was 0.7-0.98x torch fused=True; without, 1.03-1.25x (session 9: Note [CPU tuning]).
    t = {0, true, "AMD Zen 4", "table"};
  } else if (!id.vendor.empty()) {
    t.cpu = id.vendor + " family " + std::to_string(id.family) + " model " +
            std::to_string(id.model) + " (not in the table)";
  }
#endif
  return t;
}

}  // namespace

const CpuTuning& cpu_tuning() {
  static const CpuTuning tuning = [] {
    CpuTuning t = tuning_from_table();
    if (const auto env = env_choice("FUSED_OPTIM_PREFETCH")) {
      const std::string& v = *env;
      if (v == "off" || v == "0") {
        t.prefetch_ahead = 0;
      } else {
        char* end = nullptr;
        const long long n = std::strtoll(v.c_str(), &end, 10);
        TORCH_CHECK(end != v.c_str() && *end == '\0' && n > 0 && n <= (1 << 20),
                    "FUSED_OPTIM_PREFETCH must be auto, off or a distance in elements "
                    "(1 to 1048576), not ", v);
        t.prefetch_ahead = n;
      }
      t.source = "FUSED_OPTIM_PREFETCH";
    }
    if (const auto gather = env_choice("FUSED_OPTIM_GATHER_PREFETCH")) {
      const std::string& v = *gather;
      TORCH_CHECK(v == "on" || v == "off",
                  "FUSED_OPTIM_GATHER_PREFETCH must be auto, on or off, not ", v);
      t.gather_prefetch = v == "on";
      t.source = t.source == "FUSED_OPTIM_PREFETCH"
                     ? "FUSED_OPTIM_PREFETCH, FUSED_OPTIM_GATHER_PREFETCH"
                     : "FUSED_OPTIM_GATHER_PREFETCH";
    }
    return t;
  }();
  return tuning;
}

void run(MultiTensorPlan& plan, const std::vector<SegmentFn>& fns,
         const std::vector<const void*>& coeffs, double inv_grad_scale) {
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(fns.size()) == plan.size());
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(coeffs.size()) == plan.size());
  const int64_t entries = plan.num_entries();
  std::vector<SegmentFn> seg_fns(entries);
  std::vector<TensorPtrs*> ptrs(entries);
  // Note [param storage]: the storage loops see the rule's coefficients through a
  // StorageCoeffs, with the tensor's stream of this step (counted now, the update running).
  std::vector<StorageCoeffs> storage;
  const ParamMode mode = plan.param_mode();
  if (mode != ParamMode::kNearest) {
    std::vector<uint64_t> streams = mode == ParamMode::kStochastic
                                        ? plan.next_rounding_streams()
                                        : std::vector<uint64_t>(plan.size(), 0);
    storage.resize(plan.size());
    for (int64_t i = 0; i < plan.size(); ++i) storage[i] = {coeffs[i], streams[i], mode};
  }
  for (int64_t j = 0; j < entries; ++j) {
    TensorPtrs& tp = plan.entry(j);
    tp.coeffs = storage.empty() ? coeffs[plan.entry_index(j)] : &storage[plan.entry_index(j)];
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
