#include "cpu/multi_tensor.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace fused_optim::cpu {

namespace {

// A choice's value as env_choice gives it: nullopt where unset, empty or "auto".
std::optional<std::string> chosen(const char* value) {
  if (value == nullptr || *value == '\0' || std::string(value) == "auto") return std::nullopt;
  return std::string(value);
}

std::optional<int64_t> count_of(const char* name, std::optional<std::string> value, int64_t max,
                                const char* what) {
  if (!value) return std::nullopt;
  const std::string& v = *value;
  if (v == "off" || v == "0") return int64_t{0};
  char* end = nullptr;
  const long long n = std::strtoll(v.c_str(), &end, 10);
  TORCH_CHECK(end != v.c_str() && *end == '\0' && n > 0 && n <= max, name,
              " must be auto, off or ", what, ", not ", v);
  return static_cast<int64_t>(n);
}

std::optional<std::string> one_of(const char* name, std::optional<std::string> value,
                                  std::initializer_list<const char*> values) {
  if (value && std::none_of(values.begin(), values.end(),
                            [&](const char* v) { return *value == v; })) {
    std::string listed = "auto";
    size_t i = 0;
    for (const char* v : values) listed += (++i == values.size() ? " or " : ", ") + std::string(v);
    TORCH_CHECK(false, name, " must be ", listed, ", not ", *value);
  }
  return value;
}

}  // namespace

std::optional<std::string> env_choice(const char* name) { return chosen(std::getenv(name)); }

std::optional<int64_t> env_count(const char* name, int64_t max, const char* what) {
  return count_of(name, env_choice(name), max, what);
}

std::optional<std::string> env_one_of(const char* name,
                                      std::initializer_list<const char*> values) {
  return one_of(name, env_choice(name), values);
}

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
    if (const auto cap = env_one_of("FUSED_OPTIM_ISA",
                                    {"baseline", "avx2", "avx512", "avx512bf16"})) {
      const std::string& c = *cap;
      const Isa limit = c == "baseline" ? Isa::kBaseline
                        : c == "avx2"   ? Isa::kAvx2
                        : c == "avx512" ? Isa::kAvx512
                                        : Isa::kAvx512Bf16;
      best = std::min(best, limit);
    }
    return best;
  }();
  return isa;
}

Isa float_loop_isa(bool load_bound) {
  using FloatLoops = CpuTuning::FloatLoops;
  const FloatLoops loops = cpu_tuning().float_loops;
  const bool avx2 = loops == FloatLoops::kAvx2 || (loops == FloatLoops::kAvx2LoadBound && load_bound);
  return avx2 && cpu_isa() >= Isa::kAvx512 ? Isa::kAvx2 : cpu_isa();
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
  CpuTuning t{0, true, false, CpuTuning::FloatLoops::kAvx512, "unknown CPU", "default"};
#if FO_X86_CLONES
  if (id.vendor == "GenuineIntel" && __builtin_cpu_supports("avx512bf16")) {
    // The project's 2-core Xeon (Cooper Lake or newer server cores): fp32 Adam 87% -> 95%
    // of the limit, W3 Adam ~12% faster at 2 threads (sessions 5-7); on family 6 model 167
    // (AVX512-FP16, AMX) W1/W2 Adam 1.0x -> 1.1x torch fused=True (session 13). Again on
    // 2026-12-06 (docs/benchmarks.md): the prefetch kept (W4 bf16 57-68% of the limit
    // without it, 83-93% with); the 8-bit codes by the gather (AdamW with 8-bit moments
    // 22.1-22.4 ms a step, by arithmetic 26.2-26.8); SGD's float loops in AVX-512 (its AVX2
    // copy level within the noise).
    t = {384, true, false, CpuTuning::FloatLoops::kAvx512, "Intel Xeon with AVX512-BF16", "table"};
  } else if (id.vendor == "AuthenticAMD" && id.family == 0x19 &&
             ((id.model >= 0x10 && id.model <= 0x1F) || (id.model >= 0x60 && id.model <= 0xAF))) {
    // A 2-core AMD EPYC (Zen 4, family 19h model 11h): with the Xeon's prefetch, fp32 Adam
    // was 0.7-0.98x torch fused=True; without, 1.03-1.25x (session 9: Note [CPU tuning]).
    // Again on 2026-12-07, each choice timed in the same rounds in one process (bench.py
    // --tuning): the Xeon's 384 W1/W2 Adam 0.88-0.94x torch fused=True against
    // 1.04-1.07x without (in three columns that run the same code); the other rows and the
    // float loops in AVX2 (all, or SGD's) within the noise (W1 SGD 0.97-1.04x either way). 8-bit codes by arithmetic
    // (param_storage.py --tuning): AdamW with 8-bit moments 40.9-41.3 -> 32.2-32.3 ms a
    // step (2^25 float32 params), 45.8 -> 38.2 ms (bfloat16 params).
    t = {0, true, true, CpuTuning::FloatLoops::kAvx512, "AMD Zen 4", "table"};
  } else if (id.vendor == "AuthenticAMD" && id.family == 0x1A && id.model <= 0x7F) {
    // A 2-core AMD EPYC (Zen 5, family 1Ah model 02h), 2026-12-04: the Xeon's distance
    // (384) against none, alternating processes, twice each, torch fused=True in the same
    // rounds: W1/W2 fp32 at 91-104% of the limit either way, W4 bf16 86-102%; W3 Adam
    // 4.55-4.85x with it, 4.81-5.19x without (three more pairs of W3 runs). No gain: none.
    // 8-bit codes (2026-12-05, one thread): the table's 16-lane gather and compare took
    // 6.8 ns per 16 codes, the arithmetic 2.5 ns (Note [8-bit codes by arithmetic]).
    // float32 loops (2026-12-05, Note [float loops in AVX2]): the AVX2 copy for SGD's
    // (load-bound), the AVX-512 copy for the rest. The AVX2 copy streams SGD faster from
    // one core (W1 22.2 against 25.5 ms, two threads 0.99x against 0.96x torch
    // fused=True), but made the other rules measured up to 7% slower on W3 at two threads
    // (9-28% at one), and Adam slower on tensors of up to 64K elements.
    t = {0, true, true, CpuTuning::FloatLoops::kAvx2LoadBound, "AMD Zen 5", "table"};
  } else if (!id.vendor.empty()) {
    t.cpu = id.vendor + " family " + std::to_string(id.family) + " model " +
            std::to_string(id.model) + " (not in the table)";
  }
#endif
  return t;
}

// The table's choice with the FUSED_OPTIM_* variables applied, each variable's value as
// `value(name)` gives it (env_choice: the environment).
template <typename Value>
CpuTuning tuning_with(const Value& value) {
  static const CpuTuning table = tuning_from_table();  // (CPUID is slow under a hypervisor)
  CpuTuning t = table;
  if (const auto ahead = count_of("FUSED_OPTIM_PREFETCH", value("FUSED_OPTIM_PREFETCH"),
                                  int64_t{1} << 20, "a distance in elements (1 to 1048576)")) {
    t.prefetch_ahead = *ahead;
    t.source = "FUSED_OPTIM_PREFETCH";
  }
  const auto forced = [&t](const char* name) {
    t.source = t.source == "table" || t.source == "default" ? std::string(name)
                                                             : t.source + ", " + name;
  };
  if (const auto gather = one_of("FUSED_OPTIM_GATHER_PREFETCH",
                                 value("FUSED_OPTIM_GATHER_PREFETCH"), {"on", "off"})) {
    t.gather_prefetch = *gather == "on";
    forced("FUSED_OPTIM_GATHER_PREFETCH");
  }
  if (const auto codes = one_of("FUSED_OPTIM_Q8_CODES", value("FUSED_OPTIM_Q8_CODES"),
                                {"gather", "arithmetic"})) {
    t.q8_arithmetic = *codes == "arithmetic";
    forced("FUSED_OPTIM_Q8_CODES");
  }
  if (const auto loops = one_of("FUSED_OPTIM_FLOAT_LOOPS", value("FUSED_OPTIM_FLOAT_LOOPS"),
                                {"avx512", "avx2-load-bound", "avx2"})) {
    using FloatLoops = CpuTuning::FloatLoops;
    const std::string& v = *loops;
    t.float_loops = v == "avx512" ? FloatLoops::kAvx512
                    : v == "avx2" ? FloatLoops::kAvx2
                                  : FloatLoops::kAvx2LoadBound;
    forced("FUSED_OPTIM_FLOAT_LOOPS");
  }
  return t;
}

constexpr std::array<const char*, 4> kTuningVariables = {
    "FUSED_OPTIM_PREFETCH", "FUSED_OPTIM_GATHER_PREFETCH", "FUSED_OPTIM_Q8_CODES",
    "FUSED_OPTIM_FLOAT_LOOPS"};

size_t tuning_variable(const std::string& name) {
  return static_cast<size_t>(std::find(kTuningVariables.begin(), kTuningVariables.end(), name) -
                             kTuningVariables.begin());
}

// The process's own choice: the table and the variables as they were at its first use (a
// later change of the environment does not change it; set_cpu_tuning falls back to these).
struct OwnTuning {
  std::array<std::optional<std::string>, kTuningVariables.size()> values;
  CpuTuning tuning;
};

const OwnTuning& own_tuning() {
  static const OwnTuning own = [] {
    OwnTuning o;
    for (size_t i = 0; i < kTuningVariables.size(); ++i) o.values[i] = env_choice(kTuningVariables[i]);
    o.tuning = tuning_with([&](const char* name) { return o.values[tuning_variable(name)]; });
    return o;
  }();
  return own;
}

CpuTuning& tuning_in_force() {
  static CpuTuning tuning = [] {
    const CpuTuning t = own_tuning().tuning;
    gather_prefetch_on.store(t.gather_prefetch, std::memory_order_relaxed);
    return t;
  }();
  return tuning;
}

}  // namespace

std::atomic<bool> gather_prefetch_on{true};

const CpuTuning& cpu_tuning() { return tuning_in_force(); }

void set_cpu_tuning(const std::vector<std::string>& settings) {
  const OwnTuning& own = own_tuning();
  std::array<std::optional<std::string>, kTuningVariables.size()> values = own.values;
  std::array<bool, kTuningVariables.size()> given{};
  for (const std::string& setting : settings) {
    const size_t eq = setting.find('=');
    const size_t i = tuning_variable(setting.substr(0, eq));
    TORCH_CHECK(eq != std::string::npos && i < kTuningVariables.size(),
                "a CPU tuning setting is NAME=VALUE with NAME one of FUSED_OPTIM_PREFETCH, "
                "FUSED_OPTIM_GATHER_PREFETCH, FUSED_OPTIM_Q8_CODES and FUSED_OPTIM_FLOAT_LOOPS, "
                "not '", setting, "'");
    TORCH_CHECK(!given[i], "a CPU tuning setting names ", kTuningVariables[i], " twice");
    given[i] = true;
    values[i] = chosen(setting.c_str() + eq + 1);  // ("auto" or empty: the table's choice)
  }
  // (every value checked before anything changes: a bad setting changes nothing)
  const CpuTuning t =
      settings.empty() ? own.tuning
                       : tuning_with([&](const char* name) { return values[tuning_variable(name)]; });
  tuning_in_force() = t;
  gather_prefetch_on.store(t.gather_prefetch, std::memory_order_relaxed);
}

void make_cpu_choices() {
  (void)cpu_isa();
  (void)cpu_tuning();
}

// Note [storage blocks out of line] (multi_tensor.h): one copy of each per ISA.
void load_block_baseline(at::ScalarType dt, const void* base, int64_t at, float* dst, int64_t m,
                         const float* scales) {
  load_block_impl<Isa::kBaseline>(dt, base, at, dst, m, scales);
}
void store_block_baseline(at::ScalarType dt, const float* src, void* base, int64_t at, int64_t m,
                          float* scales) {
  store_block_impl<Isa::kBaseline>(dt, src, base, at, m, scales);
}
#if FO_X86_CLONES
#define FO_DEFINE_BLOCK_FNS(isa, target, level)                                                  \
  target void load_block_##isa(at::ScalarType dt, const void* base, int64_t at, float* dst,      \
                               int64_t m, const float* scales) {                                  \
    load_block_impl<level>(dt, base, at, dst, m, scales);                                         \
  }                                                                                               \
  target void store_block_##isa(at::ScalarType dt, const float* src, void* base, int64_t at,     \
                                int64_t m, float* scales) {                                       \
    store_block_impl<level>(dt, src, base, at, m, scales);                                        \
  }
FO_DEFINE_BLOCK_FNS(avx2, FO_AVX2_TARGET, Isa::kAvx2)
FO_DEFINE_BLOCK_FNS(avx512, FO_AVX512_TARGET, Isa::kAvx512)
FO_DEFINE_BLOCK_FNS(avx512bf16, FO_AVX512BF16_TARGET, Isa::kAvx512Bf16)
#undef FO_DEFINE_BLOCK_FNS
#endif

// Note [8-bit state]: one copy of the block quantization per ISA; the compiler vectorizes the
// search of the thresholds with gathers where the ISA has them.
void q8_quantize_baseline(const float* src, uint8_t* codes, float* scale, int64_t m) {
  q8_quantize(src, codes, scale, m);
}
void q8_dequantize_baseline(const uint8_t* codes, float scale, float* dst, int64_t m) {
  q8_dequantize(codes, scale, dst, m);
}
#if FO_X86_CLONES
FO_AVX2_TARGET void q8_quantize_avx2(const float* src, uint8_t* codes, float* scale, int64_t m) {
  q8_quantize(src, codes, scale, m);
}
FO_AVX2_TARGET void q8_dequantize_avx2(const uint8_t* codes, float scale, float* dst, int64_t m) {
  q8_dequantize(codes, scale, dst, m);
}
// (GCC 12 warns of "uninitialized" values inside its own AVX-512 intrinsics, which start
// from _mm512_undefined_*: not ours to mend.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Note [8-bit codes by arithmetic] (multi_tensor.h): the tables, from the maps' own
// thresholds; made once per process.
const Q8Arith& q8_arith(int u) {
  static const std::array<Q8Arith, 2> tables = [] {
    std::array<Q8Arith, 2> out{};
    for (int m = 0; m < 2; ++m) {
      Q8Arith& t = out[m];
      const float* threshold = quant8_maps().threshold[m];
      const int zero = m == 0 ? 127 : 0;  // the code of 0: the thresholds below it
      t.is_signed = m == 0;
      int n[7], first[7], count = 1;  // first[i]: the positive thresholds below decade i
      for (int i = 0; i < 7; ++i) {
        n[i] = m == 0 ? 1 << i : 2 << i;
        first[i] = count;
        count += n[i];
      }
      float b[8];  // b[i]: the threshold below decade i; b[7] that below 1
      for (int i = 0; i < 7; ++i) b[i] = threshold[zero + first[i] - 1];
      b[7] = threshold[zero + count - 1];
      for (int e = 0; e < 32; ++e) {  // the binade [2^(e-31), 2^(e-30)), 0 from 0 up
        const float lo = e == 0 ? 0.0f : std::ldexp(1.0f, e - 31), hi = std::ldexp(1.0f, e - 30);
        int below = 0, inside = 0;
        t.bnext[e] = INFINITY;
        for (int i = 0; i < 8; ++i) {
          below += b[i] < lo;
          if (b[i] >= lo && b[i] < hi) {
            ++inside;
            t.bnext[e] = b[i];
          }
        }
        if (inside > 1) std::abort();  // (the maps' spacing rules it out)
        t.base[e] = below;
      }
      for (int k = 0; k < 16; ++k) {  // k = i + 1; k = 0 and 8: u = -0.5, count 0
        t.a[k] = 0.0f;
        t.d[k] = 0.5f;
        t.first[k] = k == 0 ? 0 : count;
        t.nm1[k] = 0;
      }
      for (int i = 0; i < 7; ++i) {
        const double step = 0.9 / n[i];
        t.a[i + 1] = static_cast<float>(std::pow(10.0, 6 - i) / step);
        t.d[i + 1] = static_cast<float>(0.1 / step + 1.0);
        t.first[i + 1] = first[i];
        t.nm1[i + 1] = n[i] - 1;
      }
    }
    return out;
  }();
  return tables[u];
}

// AVX-512: Note [8-bit quantization on AVX-512] (multi_tensor.h); the same codes as
// q8_quantize.
FO_AVX512_TARGET void q8_quantize_avx512(const float* src, uint8_t* codes, float* scale,
                                         int64_t m) {
  Q8Block q;
  if (q8_begin_avx512(src, codes, scale, m, &q)) q8_codes_avx512(q, 0, m);
}

namespace {

// Note [8-bit dequantization by byte permutes]
// With AVX512-VBMI, 64 codes at a time without a gather: each map value's four bytes are
// four 256-byte tables (four registers each); a vpermt2b looks up 128 entries by the low 7
// bits of each code, two of them and a blend on the top bit give one byte of 64 values,
// and byte and word unpacks make the floats. The unpacks interleave within 128-bit lanes,
// so the codes are first permuted (one vpermb) into the order that makes the floats come
// out in memory order. The floats are the map's own values, multiplied by |scale| as in
// q8_dequantize: the same bits.
struct DequantPlanes {
  alignas(64) uint8_t byte[2][4][256];  // [map][byte of the float][code]
  alignas(64) uint8_t order[64];        // the codes' permutation
};

const DequantPlanes& dequant_planes() {
  static const DequantPlanes planes = [] {
    DequantPlanes d{};
    for (int u = 0; u < 2; ++u) {
      for (int c = 0; c < 256; ++c) {
        uint32_t bits;
        std::memcpy(&bits, &quant8_maps().value[u][c], 4);
        for (int k = 0; k < 4; ++k) d.byte[u][k][c] = static_cast<uint8_t>(bits >> (8 * k));
      }
    }
    // Byte 16L + 4q + j of a lane L of the permuted codes becomes float 16q + 4L + j.
    for (int lane = 0; lane < 4; ++lane) {
      for (int q = 0; q < 4; ++q) {
        for (int j = 0; j < 4; ++j) d.order[16 * lane + 4 * q + j] = static_cast<uint8_t>(16 * q + 4 * lane + j);
      }
    }
    return d;
  }();
  return planes;
}

// Whether q8_dequantize_avx512 uses the byte permutes: the CPU has AVX512-VBMI and the ISA
// is not capped below avx512bf16 (so FUSED_OPTIM_ISA=avx512 tests the gathers).
bool dequant_by_permutes() {
  static const bool on = cpu_isa() >= Isa::kAvx512Bf16 && __builtin_cpu_supports("avx512vbmi");
  return on;
}

__attribute__((target(FO_AVX512_ISA ",avx512vbmi"))) void q8_dequantize_vbmi(
    const uint8_t* codes, float scale, float* dst, int64_t m) {
  const DequantPlanes& d = dequant_planes();
  const uint8_t(*planes)[256] = d.byte[std::signbit(scale) ? 1 : 0];
  const __m512 va = _mm512_set1_ps(std::fabs(scale));
  const __m512i order = _mm512_load_si512(d.order);
  __m512i t[4][4];
  for (int k = 0; k < 4; ++k) {
    for (int h = 0; h < 4; ++h) t[k][h] = _mm512_load_si512(planes[k] + 64 * h);
  }
  int64_t i = 0;
  for (; i + 64 <= m; i += 64) {
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes + i));
    const __mmask64 high = _mm512_movepi8_mask(c);  // codes 128-255
    __m512i b[4];
    for (int k = 0; k < 4; ++k) {
      b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t[k][0], c, t[k][1]),
                                    _mm512_permutex2var_epi8(t[k][2], c, t[k][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i f[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                          _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
    for (int q = 0; q < 4; ++q) {
      _mm512_storeu_ps(dst + i + 16 * q, _mm512_mul_ps(_mm512_castsi512_ps(f[q]), va));
    }
  }
  q8_dequantize(codes + i, scale, dst + i, m - i);
}

}  // namespace

FO_AVX512_TARGET void q8_dequantize_avx512(const uint8_t* codes, float scale, float* dst,
                                           int64_t m) {
  if (dequant_by_permutes()) return q8_dequantize_vbmi(codes, scale, dst, m);
  const float* value = quant8_maps().value[std::signbit(scale) ? 1 : 0];
  const float a = std::fabs(scale);
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512i c =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_i32gather_ps(c, value, 4), va));
  }
  for (; i < m; ++i) dst[i] = value[codes[i]] * a;
}
#pragma GCC diagnostic pop
#endif

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
  if (plan.mixed_storage()) {
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
  if (plan.serial()) {  // Note [aliased params] (plan.cpp): one thread, in list order
    for (int64_t j = 0; j < entries; ++j) {
      plan.begin_serial_entry(j);
      seg_fns[j](*ptrs[j], 0, offsets_[j + 1] - offsets_[j]);
      plan.end_serial_entry(j);
    }
    plan.finish();
    return;
  }
  if (plan.has_quantized_states()) {
    // Note [8-bit state]: a quantization block is one thread's, whole: the range split
    // across threads is one of blocks (each tensor's last one may be short).
    std::vector<int64_t> units(static_cast<size_t>(entries) + 1, 0);
    for (int64_t j = 0; j < entries; ++j) {
      units[j + 1] = units[j] + (plan.entry_numel(j) + kQuantBlock - 1) / kQuantBlock;
    }
    at::parallel_for(0, units.back(), kGrainSize / kQuantBlock, [&](int64_t begin, int64_t end) {
      auto it = std::upper_bound(units.begin(), units.end(), begin);
      size_t j = static_cast<size_t>(it - units.begin()) - 1;
      while (begin < end) {
        const int64_t hi = std::min(end, units[j + 1]);
        const int64_t numel = offsets_[j + 1] - offsets_[j];
        seg_fns[j](*ptrs[j], (begin - units[j]) * kQuantBlock,
                   std::min(numel, (hi - units[j]) * kQuantBlock));
        begin = hi;
        ++j;
      }
    });
    plan.finish();
    return;
  }
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
