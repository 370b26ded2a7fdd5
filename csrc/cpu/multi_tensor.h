#pragma once
// The CPU multi-tensor machinery every algorithm shares: input checks, layout handling,
// one parallel region over all elements of all tensors, and run-time ISA selection.
// An algorithm brings only its update rule (update_rules.h) and its scalars.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "plan.h"
#include "rounding.h"
#include "cpu/quant8.h"
#include "cpu/simd.h"
#include "cpu/tuning.h"
#include "rule_select.h"
#include "update_rules.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fused_optim::cpu {

// Note [ISA dispatch]
// Each segment loop is compiled up to four times from the same source: for the x86-64
// baseline, with AVX2+FMA+F16C, with AVX-512, and (bfloat16 only) with AVX-512 plus
// AVX512-BF16, each through a target attribute on that one function (so nothing else in
// the library, and nothing it shares with torch's headers, changes ISA). The 16-bit loops
// of the vector copies run the rules on vectors (Note [vector rules] in simd.h). The
// widest copy the CPU supports is chosen at run time;
// FUSED_OPTIM_ISA=baseline|avx2|avx512|avx512bf16 caps it (tests compare all four); the
// avx512bf16 level also lets the 8-bit dequantization use AVX512-VBMI's byte permutes
// where the CPU has them (Note [8-bit dequantization by byte permutes]).
// Every fma is explicit and the build has -ffp-contract=off, so all copies produce the
// same bits: sqrt, division and fma are exactly rounded at any vector width (and on a CPU
// without FMA, std::fma is libm's correctly rounded fma).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(FUSED_OPTIM_BASELINE_ONLY)
#define FO_X86_CLONES 1
#define FO_AVX2_TARGET __attribute__((target(FO_AVX2_ISA), flatten))
// (GCC alone takes prefer-vector-width in a target attribute; clang would drop the whole
// attribute, and compile the AVX-512 copies for the baseline.)
#if defined(__clang__)
#define FO_WIDE_VECTORS
#else
#define FO_WIDE_VECTORS ",prefer-vector-width=512"
#endif
#define FO_AVX512_TARGET __attribute__((target(FO_AVX512_ISA FO_WIDE_VECTORS), flatten))
#define FO_AVX512BF16_TARGET \
  __attribute__((target(FO_AVX512BF16_ISA FO_WIDE_VECTORS), flatten))
#else
#define FO_X86_CLONES 0
#endif

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
// The ISA of the loops: the best the CPU has, capped by FUSED_OPTIM_ISA. Decided once.
Isa cpu_isa();

// Note [float loops in AVX2]
// On a CPU with AVX-512, the loops of float32 and float64 params (the segment loops whose
// elements are their own math type) can run the AVX2 copy instead, per the tuning table
// (Note [CPU tuning]): for the rules whose loops wait on their loads (Rule::kLoadBound:
// SGD's two fmas an element), or for all; FUSED_OPTIM_FLOAT_LOOPS=avx512|avx2-load-bound|
// avx2 forces it, for experiments. The bandwidth probe's float stream counts as
// load-bound. Measured on the Zen 5 (2026-12-05, docs/benchmarks.md, CPU tuning): one core
// there streams fewer bytes a second through 512-bit loads (SGD with momentum on 2^26
// floats, one thread, 25.5 ms a step in the AVX-512 copy, 22.2 in the AVX2 one, torch's
// 256-bit fused=True 23.0; the AVX-512 loop with each load made of two 256-bit halves was
// as fast as the AVX2 copy), but where a rule computes more, the 512-bit vectors' fewer
// instructions win: on 5,000 small tensors NAdam, RAdam, Adadelta, Rprop, RMSprop and Adam
// were 2-7% faster in AVX-512 at two threads and 9-16% at one (Adagrad and AdamW the same
// at two, 19-22% faster at one), and Adam on tensors of up to 64K elements. So
// the Zen 5's row runs SGD's float loops in AVX2 and the rest in AVX-512. Same bits either
// way (Note [ISA dispatch]; the tests run each copy with FUSED_OPTIM_FLOAT_LOOPS=avx512,
// and compare the choices).
// The ISA of a float32/float64 loop, of a load-bound rule or not.
Isa float_loop_isa(bool load_bound);

// The math type of the vector loop of T's params in kIsa's copy (Note [vector rules]), or
// opmath (M) where the loop is scalar code, left to the compiler to vectorize: float and
// double everywhere, anything on the baseline, and bfloat16 without AVX512-BF16, where
// GCC's code for c10's integer rounding beats ours (with AVX2, W4-like AdamW took 31 ms
// a step as scalar code and 35 ms on F32x8, which runs out of registers).
template <typename T, Isa kIsa>
struct VectorMathOf {
  using type = at::opmath_type<T>;
};
#if FO_VECTOR_RULES
template <Isa kIsa>
struct VectorMathOf<c10::Half, kIsa> {
  using type = std::conditional_t<kIsa >= Isa::kAvx512, F32x16,
                                  std::conditional_t<kIsa == Isa::kAvx2, F32x8, float>>;
};
template <Isa kIsa>
struct VectorMathOf<c10::BFloat16, kIsa> {
  using type = std::conditional_t<kIsa == Isa::kAvx512Bf16, F32x16, float>;
};
#endif
template <typename T, Isa kIsa>
using VectorMath = typename VectorMathOf<T, kIsa>::type;

// Elements converted at a time for float16 params in the baseline loops: the float copies
// stay in L1.
constexpr int64_t kBlock = 256;
// Below this many elements in total, no threads are started.
constexpr int64_t kGrainSize = 32768;

using SegmentFn = void (*)(const TensorPtrs&, int64_t begin, int64_t end);

// ---- 16-bit loads and stores (same rounding as c10: round to nearest even) -----------
FO_INLINE float widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
FO_INLINE float widen(c10::Half x) { return static_cast<float>(x); }
FO_INLINE void narrow(float f, c10::BFloat16* out) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  out->x = (f != f) ? uint16_t(0x7FC0) : static_cast<uint16_t>(round_bf16_bits(bits));
}
// c10::Half's rounding, and its NaN made explicit (c10_nans_f16: built with -mf16c,
// c10::Half(float) would keep a NaN's payload).
FO_INLINE void narrow(float f, c10::Half* out) { out->x = c10_nans_f16(c10::Half(f).x); }

// A block of 16-bit values widened to float, and rounded back (the float16 baseline
// loops, and the storage loops).
template <typename T>
FO_INLINE void widen_block(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}
template <typename T>
FO_INLINE void narrow_block(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) narrow(src[i], dst + i);
}

// Element access in opmath precision, for every supported T.
template <typename T>
FO_INLINE at::opmath_type<T> load(const T* p) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    return *p;
  } else {
    return widen(*p);
  }
}
template <typename T>
FO_INLINE void store(at::opmath_type<T> v, T* p) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    *p = v;
  } else {
    narrow(v, p);
  }
}

// Note [software prefetch]
// The update's arithmetic (Adam: two divisions and a square root per element) delays the
// loads, and on some CPUs the hardware prefetchers then do not run far enough ahead of
// them: on the project's 2-core Intel Xeon (AVX512-BF16), fp32 Adam on one big tensor
// reached ~87% of the measured bandwidth limit. So the loops go in chunks of
// kPrefetchChunk elements and, where the CPU gains from it, ask before each chunk for the
// memory of the chunk cpu_tuning().prefetch_ahead elements further on (on that Xeon:
// fp32 Adam ~95%; near the end of a tensor the prefetches run on into the next ones,
// which made W3 Adam ~12% faster there). The same prefetches made fp32 Adam 10-30% slower
// on an AMD EPYC (Zen 4), whose own prefetchers keep up: the distance is chosen per CPU
// (Note [CPU tuning]), and 0 means none. A prefetch changes no result.
constexpr int64_t kPrefetchChunk = 128;

// (The distance: Note [CPU tuning] in cpu/tuning.h.)

// Asks for elements [from, from + count) of a segment of n elements. Where that runs past
// the end of the segment's tensor, it asks for the elements as far into the entries that
// follow (`next`: null where the segment ends before its tensor does, or nothing follows):
// with many small tensors, each would otherwise start with a run of cache misses.
template <typename T, int NS>
FO_INLINE void prefetch_lines(T* p, T* g, T* const* s, int64_t from, int64_t to) {
  for (int64_t b = from; b < to; b += 64 / static_cast<int64_t>(sizeof(T))) {
    __builtin_prefetch(p + b, 1);
    __builtin_prefetch(g + b, 0);
    for (int k = 0; k < NS; ++k) __builtin_prefetch(s[k] + b, 1);
  }
}
template <typename T, int NS>
FO_INLINE void prefetch_ahead(T* p, T* g, T* const* s, int64_t from, int64_t count, int64_t n,
                              const TensorPtrs* next) {
  prefetch_lines<T, NS>(p, g, s, from, std::min(n, from + count));
  // Then the entries that follow, their bytes asked for as if they held T too.
  int64_t to = from + count - n;
  from -= n;
  for (; next != nullptr && to > 0; next = next->next) {
    if (from < next->numel) {
      T* ns[kMaxStates > NS ? kMaxStates : NS];
      for (int k = 0; k < NS; ++k) ns[k] = static_cast<T*>(next->state[k]);
      prefetch_lines<T, NS>(static_cast<T*>(next->param), static_cast<T*>(next->grad), ns,
                            std::max<int64_t>(from, 0), std::min(to, next->numel));
    }
    from -= next->numel;
    to -= next->numel;
  }
}

// Note [the unscaled grad as stored]
// Where the kernel unscales the grads (a GradScaler's scale handed to it: fused=True,
// max_grad_norm=), it stores each unscaled grad back, as GradScaler.unscale_ does, and the
// rule takes the value stored: for 16-bit grads, the product rounded to their dtype, as the
// step after unscale_ reads it. Until 2026-12-07 the rule took the float product, and its
// moments and params differed from unscale_ then the step wherever the product was not a
// 16-bit value: with a scale that is not a power of two, almost everywhere (fused=True;
// max_grad_norm= unscales such grads in place first); with a power of two, where the
// product is subnormal in the 16-bit type (below 2^-126 for bfloat16). Found by a
// differential fuzz; Adafactor's grad_value and Muon did it this way already, and the
// CUDA loops now do it too.
//
// The loop over one contiguous segment of one tensor. `Rule` is an update rule from
// update_rules.h; it sees each element in opmath precision (or, in the 16-bit loops of
// the vector copies, a vector of them: Note [vector rules]).
template <typename T, bool kUnscale, typename Rule, Isa kIsa>
FO_INLINE void segment_loop(const TensorPtrs& t, int64_t begin, int64_t end) {
  using M = at::opmath_type<T>;
  constexpr int NS = Rule::kStates;
  const Rule rule(*static_cast<const typename Rule::Coeffs*>(t.coeffs));
  const M inv_scale = static_cast<M>(t.inv_grad_scale);
  T* p = static_cast<T*>(t.param) + begin;
  T* g = static_cast<T*>(t.grad) + begin;
  T* s[kMaxStates > NS ? kMaxStates : NS];
  for (int k = 0; k < NS; ++k) s[k] = static_cast<T*>(t.state[k]) + begin;
  const int64_t n = end - begin;
  // Prefetches run on into the next entry only where this segment ends with its tensor.
  const TensorPtrs* next = end == t.numel ? t.next : nullptr;

  // 16-bit params with AVX2 or AVX-512: the rule on a vector of floats at a time,
  // converted in registers (Note [vector rules]); the scalar loop below does the tail.
  // (Without a vector, V is M, never used.)
  using V = VectorMath<T, kIsa>;
  constexpr bool kVectorRule = !std::is_same_v<V, M>;
  if constexpr (std::is_same_v<T, M> || std::is_same_v<T, c10::BFloat16> || kVectorRule) {
    // float/double: update memory in place; bfloat16: widening is a shift and rounding a
    // few integer operations, so they fuse into the update's vector loop, where they
    // overlap the divisions. A chunk at a time (Note [software prefetch]; 16-bit types
    // ask for the same bytes ahead as float).
    const int64_t ahead = std::is_same_v<T, M> ? cpu_tuning().prefetch_ahead
                                               : 2 * cpu_tuning().prefetch_ahead;
    const typename Rule::template WithMath<V> vrule(
        *static_cast<const typename Rule::Coeffs*>(t.coeffs));
    const V vinv_scale(inv_scale);
    // Under MXCSR.DAZ the vector bfloat16 stores cannot see subnormals (simd.h): the
    // scalar loop does those segments. (float16 stores need no such check.)
    bool vectors_exact = true;
    if constexpr (kVectorRule && std::is_same_v<T, c10::BFloat16>) vectors_exact = !daz_is_set();
    for (int64_t c = 0; c < n; c += kPrefetchChunk) {
      const int64_t chunk_end = std::min(n, c + kPrefetchChunk);
      if (ahead > 0) prefetch_ahead<T, NS>(p, g, s, chunk_end + ahead, kPrefetchChunk, n, next);
      int64_t i = c;
      if constexpr (kVectorRule) {
        constexpr int64_t kWidth = sizeof(V) / sizeof(float);
        for (; vectors_exact && i + kWidth <= chunk_end; i += kWidth) {
          V pv = V::load(p + i);
          V gv = V::load(g + i);
          if constexpr (kUnscale) {
            gv = gv * vinv_scale;
            gv.store(g + i);
            // Note [the unscaled grad as stored]
            if constexpr (!std::is_same_v<T, M>) gv = V::load(g + i);
          }
          V sv[NS > 0 ? NS : 1];
          for (int k = 0; k < NS; ++k) sv[k] = V::load(s[k] + i);
          vrule(pv, gv, sv);
          pv.store(p + i);
          for (int k = 0; k < NS; ++k) sv[k].store(s[k] + i);
        }
      }
#pragma GCC ivdep
      for (; i < chunk_end; ++i) {
        M pv = load(p + i);
        M gv = load(g + i);
        if constexpr (kUnscale) {
          gv = gv * inv_scale;
          store(gv, g + i);
          if constexpr (!std::is_same_v<T, M>) gv = load(g + i);  // (the same Note)
        }
        M sv[NS > 0 ? NS : 1];
        for (int k = 0; k < NS; ++k) sv[k] = load(s[k] + i);
        rule(pv, gv, sv);
        store(pv, p + i);
        for (int k = 0; k < NS; ++k) store(sv[k], s[k] + i);
      }
    }
  } else {
    // float16 on the baseline: widen a block into float buffers, update them (a loop the
    // compiler vectorizes), round back.
    const int64_t ahead = cpu_tuning().prefetch_ahead;
    alignas(64) M pb[kBlock];
    alignas(64) M gb[kBlock];
    alignas(64) M sb[NS > 0 ? NS : 1][kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      if (ahead > 0) prefetch_ahead<T, NS>(p, g, s, b + m + ahead, kBlock, n, next);
      widen_block(p + b, pb, m);
      widen_block(g + b, gb, m);
      for (int k = 0; k < NS; ++k) widen_block(s[k] + b, sb[k], m);
      for (int64_t i = 0; i < m; ++i) {
        M pv = pb[i];
        M gv = gb[i];
        if constexpr (kUnscale) {
          T stored;  // (Note [the unscaled grad as stored])
          store(gv * inv_scale, &stored);
          gv = load(&stored);
          gb[i] = gv;
        }
        M sv[NS > 0 ? NS : 1];
        for (int k = 0; k < NS; ++k) sv[k] = sb[k][i];
        rule(pv, gv, sv);
        pb[i] = pv;
        for (int k = 0; k < NS; ++k) sb[k][i] = sv[k];
      }
      narrow_block(pb, p + b, m);
      if constexpr (kUnscale) narrow_block(gb, g + b, m);
      for (int k = 0; k < NS; ++k) narrow_block(sb[k], s[k] + b, m);
    }
  }
}

// A block of 16-bit values widened to float, and rounded back, with kIsa's vector
// conversions where its loops have them (float16 with AVX2 or AVX-512: the same bits as
// widen() and narrow(), Note [vector rules] in simd.h), else as widen_block/narrow_block.
template <typename T, Isa kIsa>
FO_INLINE void widen_block_isa(const T* src, float* dst, int64_t m) {
  using V = VectorMath<T, kIsa>;
  int64_t i = 0;
  if constexpr (!std::is_same_v<V, float>) {  // (float16, or bfloat16 with AVX512-BF16)
    constexpr int64_t kWidth = sizeof(V) / sizeof(float);
    for (; i + kWidth <= m; i += kWidth) {
      const V v = V::load(src + i);
      std::memcpy(dst + i, &v.v, sizeof(V));
    }
  }
  widen_block(src + i, dst + i, m - i);
}
template <typename T, Isa kIsa>
FO_INLINE void narrow_block_isa(const float* src, T* dst, int64_t m) {
  using V = VectorMath<T, kIsa>;
  int64_t i = 0;
  if constexpr (!std::is_same_v<V, float>) {  // (float16, or bfloat16 with AVX512-BF16)
    // Under MXCSR.DAZ the vector bfloat16 stores cannot see subnormals (Note [vector
    // rules] in simd.h): the scalar rounding does those blocks. Checked here, on the
    // thread that runs the block, as well as in pick_storage_fn, which reads the calling
    // thread's MXCSR: a worker thread's flag is its own.
    constexpr int64_t kWidth = sizeof(V) / sizeof(float);
    const int64_t vector_end = std::is_same_v<T, c10::BFloat16> && daz_is_set() ? 0 : m;
    for (; i + kWidth <= vector_end; i += kWidth) {
      V v;
      std::memcpy(&v.v, src + i, sizeof(V));
      v.store(dst + i);
    }
  }
  narrow_block(src + i, dst + i, m - i);
}

// The coefficients a storage loop sees for a tensor (Note [param storage] in plan.h): the
// rule's, and the tensor's stream of random bits for stochastic rounding.
struct StorageCoeffs {
  const void* rule_coeffs;
  uint64_t rounding_stream;
  ParamMode mode;
};

// Note [8-bit state] (quant8.h): a block quantized or dequantized, one copy per ISA (not
// per rule: they are out of line, in multi_tensor.cpp).
void q8_quantize_baseline(const float* src, uint8_t* codes, float* scale, int64_t m);
void q8_dequantize_baseline(const uint8_t* codes, float scale, float* dst, int64_t m);
#if FO_X86_CLONES
void q8_quantize_avx2(const float* src, uint8_t* codes, float* scale, int64_t m);
void q8_dequantize_avx2(const uint8_t* codes, float scale, float* dst, int64_t m);
void q8_quantize_avx512(const float* src, uint8_t* codes, float* scale, int64_t m);
void q8_dequantize_avx512(const uint8_t* codes, float scale, float* dst, int64_t m);
#endif

#if FO_X86_CLONES
// Note [8-bit quantization on AVX-512]
// A block's codes 16 at a time, the table's lookups as gathers (Note [quantization by
// table] in quant8.h); the same codes as q8_quantize. In two steps, so that the storage
// loop can run the second in step with the rule of the next block (Note [8-bit state a
// block behind]): q8_begin_avx512 looks at the whole block and writes its scale,
// q8_codes16_avx512 then makes 16 codes at a time. The block's absolute maximum comes from
// vrangeps (the larger magnitude, its sign cleared: one instruction for the fabs and the
// max; it passes over a NaN, as maxNum does), whether any value is negative from the
// running minimum (-0.0 is not < 0), and whether any is NaN from a running sum of v * 0,
// which only a NaN or an infinity makes NaN (those rare blocks are then looked at again).
//
// Note [8-bit without division]
// x = v / absmax, correctly rounded, without a division per element (a vector division
// is the slowest instruction of the loop): r = RN(1/absmax) once per block, q0 = RN(v * r),
// then two corrections q' = RN(q + r * (v - q * absmax)), the remainder an fma. After the
// first, q is faithful (within an ulp of v / absmax); then, r being correctly rounded,
// Markstein's theorem makes the second's result RN(v / absmax), provided nothing
// underflows or overflows (Markstein, "Computation of elementary functions on the IBM
// RISC System/6000 processor", 1990; Muller et al., Handbook of Floating-Point Arithmetic,
// the theorem on division by an fma). So the block takes this path only where absmax is
// in [2^-60, 2^100]: r is then normal, and where x is within reach of a threshold
// (|x| > 2^-26, the thresholds' smallest magnitude being above 5e-8), v is normal and the
// remainder exactly representable (where it is subnormal or 0, q is already correctly
// rounded). A smaller |x| may come out inexact, but with its sign (a -0 comes out +0),
// and every such x has the code of 0. Elsewhere (absmax NaN, infinite, huge or tiny, or
// 0) the block divides. tests/test_state_dtype.py checks values at and around every
// threshold, for many absmax, against the reference.
constexpr float kFastDivMin = 0x1p-60f, kFastDivMax = 0x1p100f;

// Note [8-bit codes by arithmetic]
// Where the tuning table says so (Note [CPU tuning]; FUSED_OPTIM_Q8_CODES forces it), the
// AVX-512 copies find a fast block's codes (Note [8-bit without division]: |x| <= 1) by
// arithmetic instead of the table's gather: on the Zen 5 a 16-lane gather and its compare
// took 6.8 ns per 16 codes, this 2.5 ns. The nonnegative half of a map is 0, seven decades
// of values in arithmetic progression (decade i: n_i values 10^(i-6) (0.1 + (j + 0.5) 0.9 /
// n_i), n_i = 2^i in the signed map, 2^(i+1) in the unsigned one), and 1. For a = |x|:
// - its decade: each binade [2^e, 2^(e+1)) holds at most one of the eight thresholds B_i
//   that part decades (B_i below decade i, B_7 below 1; checked as the tables are made),
//   so a 32-entry permute by a's exponent gives the decade below that threshold and the
//   threshold, and one compare with it the decade (i = -1: below B_0; i = 7: above B_7);
// - inside decade i the thresholds are the midpoints of neighbouring values, at the
//   integers 0 .. n_i - 2 of u = a 10^(6-i) n_i / 0.9 - (0.1 n_i / 0.9 + 1), so the count
//   of thresholds below a is first_i (those below the decade) + min(ceil(u), n_i - 1)
//   (u is above -0.87 from a decade's lower threshold up).
// The thresholds are floats rounded from the double midpoints of floats rounded from the
// exact values (each within 2^-23 of its exact midpoint), and u is one fma of constants
// rounded to float, |u| < 145: on the scale of u each is within 1.7e-5 of exact, so where
// u is 2^-10 or more from every integer (and a is not a decade's threshold itself) the
// count is exact. A vector with a lane nearer (about 3% of them) takes the gather.
// The unsigned map's code is the count; the signed map's 127 + count for x >= 0, and for
// x < 0 the thresholds below x, 127 - min(count, 127) (its negative half mirrors the
// positive one, but the map holds 1 and not -1; a count of thresholds <= a instead of < a
// differs only where a is on a threshold, where the gather decides). The same codes as
// the table's (tests/test_state_dtype.py runs its code tests with each choice forced).
struct Q8Arith {
  alignas(64) float bnext[32];   // by binade: the decade threshold inside it, or +inf
  alignas(64) int32_t base[32];  // by binade: i + 1 of the decade below that threshold
  alignas(64) float a[16], d[16];          // by i + 1: u = a * this - d
  alignas(64) int32_t first[16], nm1[16];  // by i + 1: first_i and n_i - 1
  bool is_signed;
};
const Q8Arith& q8_arith(int u);  // u: 0 signed, 1 unsigned (Quant8Maps' order)

// (GCC 12 warns of "uninitialized" values inside its own AVX-512 intrinsics, which start
// from _mm512_undefined_*, wherever these are inlined: not ours to mend.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// A block whose scale is written and whose codes are still to make (none: codes null).
struct Q8Block {
  const float* src;
  uint8_t* codes;
  const uint32_t* entry;  // the map's table
  const Q8Arith* arith;   // Note [8-bit codes by arithmetic], where the block takes them
  float amax;
  bool fast;  // Note [8-bit without division]
  // amax and RN(1 / amax) on 16 lanes, made once per block, not for each 16 codes (where
  // the scalar division took the divider from the rule's, and the broadcasts a vector
  // port: the loops reload a block's fields after each store of codes, which may alias them)
  __m512 va, vr;
};

// The block's scale written, and q made; false, and q left with no codes, where nothing
// is left to do (no value above 0, or a NaN: every code is that of 0, written here).
FO_AVX512_INLINE bool q8_begin_avx512(const float* src, uint8_t* codes, float* scale,
                                      int64_t m, Q8Block* q) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 vmax = zero, vmin = zero, vnan = zero;
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    vmax = _mm512_range_ps(vmax, v, 0x0B);  // max |.|, sign cleared
    vmin = _mm512_min_ps(vmin, v);
    vnan = _mm512_fmadd_ps(v, zero, vnan);
  }
  float amax = _mm512_reduce_max_ps(vmax);
  bool any_negative = _mm512_reduce_min_ps(vmin) < 0.0f, any_nan = false;
  if (_mm512_cmp_ps_mask(vnan, vnan, _CMP_UNORD_Q) != 0) {
    for (int64_t k = 0; k < i; ++k) any_nan |= src[k] != src[k];
  }
  for (int64_t k = i; k < m; ++k) {
    const float a = std::fabs(src[k]);
    amax = a > amax ? a : amax;
    any_negative |= src[k] < 0.0f;
    any_nan |= src[k] != src[k];
  }
  const uint32_t* entry = q8_block_map(amax, any_negative, any_nan, scale);
  if (!(amax > 0.0f)) {
    std::memset(codes, q8_code(0.0f, entry), static_cast<size_t>(m));
    *q = Q8Block{};
    return false;
  }
  const bool fast = amax >= kFastDivMin && amax <= kFastDivMax;
  const Q8Arith* arith = nullptr;
  if (fast && cpu_tuning().q8_arithmetic) {
    arith = &q8_arith(std::signbit(*scale) ? 1 : 0);  // (the unsigned map's scale is negative)
  }
  *q = Q8Block{src, codes, entry, arith, amax, fast, _mm512_set1_ps(amax),
               _mm512_set1_ps(1.0f / amax)};
  return true;
}

// Note [8-bit codes by arithmetic]: the codes of x (16 lanes, |x| <= 1), or false where a
// lane is too near a threshold to tell.
FO_AVX512_INLINE bool q8_arith_codes16_avx512(const Q8Arith& t, __m512 x, __m512i* codes) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)));
  // the binade: [2^-31, 2^0] -> 0..31, everything below 2^-30 to 0 (B_0 is above 2^-26)
  const __m512i b = _mm512_max_epi32(
      _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), _mm512_set1_epi32(96)),
      _mm512_setzero_si512());
  const __m512 bnext = _mm512_permutex2var_ps(_mm512_load_ps(t.bnext), b, _mm512_load_ps(t.bnext + 16));
  const __m512i base = _mm512_permutex2var_epi32(_mm512_load_si512(t.base), b,
                                                 _mm512_load_si512(t.base + 16));
  // a on a decade's threshold (needed for x = -B_0 alone: elsewhere u is then near an
  // integer, or the count comes out right either way)
  const __mmask16 tie = _mm512_cmp_ps_mask(a, bnext, _CMP_EQ_OQ);
  const __m512i k = _mm512_mask_add_epi32(base, _mm512_cmp_ps_mask(a, bnext, _CMP_GT_OQ), base,
                                          _mm512_set1_epi32(1));
  const __m512 u = _mm512_fmsub_ps(a, _mm512_permutexvar_ps(k, _mm512_load_ps(t.a)),
                                   _mm512_permutexvar_ps(k, _mm512_load_ps(t.d)));
  // u - round(u) (vreduceps), and the count: ceil(u) (u > -0.87 in every decade, so only
  // its top needs the clamp)
  const __mmask16 near = _mm512_cmp_ps_mask(
      _mm512_abs_ps(_mm512_reduce_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),
      _mm512_set1_ps(0x1p-10f), _CMP_LT_OQ);
  if (__builtin_expect((near | tie) != 0, 0)) return false;
  __m512i c = _mm512_min_epi32(_mm512_cvt_roundps_epi32(u, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC),
                               _mm512_permutexvar_epi32(k, _mm512_load_si512(t.nm1)));
  c = _mm512_add_epi32(c, _mm512_permutexvar_epi32(k, _mm512_load_si512(t.first)));
  if (t.is_signed) {
    const __m512i c127 = _mm512_set1_epi32(127);
    c = _mm512_mask_sub_epi32(_mm512_add_epi32(c, c127), _mm512_movepi32_mask(bits), c127,
                              _mm512_min_epi32(c, c127));
  }
  *codes = c;
  return true;
}

// The codes of elements [i, i + 16) of q's block.
FO_AVX512_INLINE void q8_codes16_avx512(const Q8Block& q, int64_t i) {
  const __m512 v = _mm512_loadu_ps(q.src + i);
  const __m512 va = q.va;
  __m512 x;
  if (q.fast) {
    const __m512 vr = q.vr;
    x = _mm512_mul_ps(v, vr);
    x = _mm512_fmadd_ps(_mm512_fnmadd_ps(x, va, v), vr, x);
    x = _mm512_fmadd_ps(_mm512_fnmadd_ps(x, va, v), vr, x);
  } else {
    x = _mm512_div_ps(v, va);
  }
  __m512i c;
  if (q.arith != nullptr && q8_arith_codes16_avx512(*q.arith, x, &c)) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes + i), _mm512_cvtepi32_epi8(c));
    return;
  }
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i all = _mm512_set1_epi32(-1);
  const __m512i e = _mm512_mask_i32gather_epi32(all, 0xFFFF, _mm512_srli_epi32(bits, 16),
                                                q.entry, 4);
  // y: the low 16 bits, inverted where the sign is set ((bits ^ sign) & 0xFFFF)
  const __m512i y = _mm512_ternarylogic_epi32(bits, _mm512_srai_epi32(bits, 31),
                                              _mm512_set1_epi32(0xFFFF), 0x28);
  c = _mm512_mask_add_epi32(e, _mm512_cmpgt_epu32_mask(y, _mm512_srli_epi32(e, 8)), e,
                            _mm512_set1_epi32(1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes + i), _mm512_maskz_cvtepi32_epi8(0xFFFF, c));
}

// The codes of elements [from, to) of q's block, from a multiple of 16.
FO_AVX512_INLINE void q8_codes_avx512(const Q8Block& q, int64_t from, int64_t to) {
  int64_t i = from;
  for (; i + 16 <= to; i += 16) q8_codes16_avx512(q, i);
  for (; i < to; ++i) q.codes[i] = static_cast<uint8_t>(q8_code(q.src[i] / q.amax, q.entry));
}

// rounding_bits(stream, first + j) (rounding.h) for the 16 lanes j.
FO_AVX512_INLINE __m512i rounding_bits16_avx512(uint64_t stream, int64_t first) {
  const uint32_t lo = static_cast<uint32_t>(stream), hi = static_cast<uint32_t>(stream >> 32);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i i = _mm512_add_epi32(
      _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first) + hi)), iota);
  const __m512i bits = reinterpret_cast<__m512i>(
      hash32(reinterpret_cast<U32x16>(i) ^ lo));  // (rounding_bits, on 16 lanes)
  return bits;
}

// bf16_stochastic_bits(x[j], rounding_bits(stream, first + j)) for the 16 lanes j of x,
// stored to dst.
FO_AVX512_INLINE void bf16_stochastic16_avx512(__m512 x, uint16_t* dst, uint64_t stream,
                                               int64_t first) {
  const __m512i bits = rounding_bits16_avx512(stream, first);
  const __m512i u = _mm512_castps_si512(x);
  __m512i sum = _mm512_add_epi32(u, _mm512_and_si512(bits, _mm512_set1_epi32(0xFFFF)));
  // Infinities and NaN (rare: one vfpclassps finds them) keep their own rounding.
  if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0x99) != 0, 0)) {  // QNaN, SNaN, +-inf
    const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i inf = _mm512_set1_epi32(0x7F800000);
    sum = _mm512_mask_mov_epi32(sum, _mm512_cmpeq_epi32_mask(magnitude, inf), u);
    sum = _mm512_mask_mov_epi32(sum, _mm512_cmpgt_epu32_mask(magnitude, inf),
                                _mm512_set1_epi32(0x7FC00000));
  }
  // The high halves of the 16 sums (their odd 16-bit words) in one permute: the stored
  // bfloat16 bits.
  const __m512i odd_words = _mm512_setr_epi32(0x00030001, 0x00070005, 0x000B0009, 0x000F000D,
                                              0x00130011, 0x00170015, 0x001B0019, 0x001F001D,
                                              0, 0, 0, 0, 0, 0, 0, 0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_castsi512_si256(_mm512_permutexvar_epi16(odd_words, sum)));
}
// f16_stochastic_float(x[j], rounding_bits(stream, first + j)) for the 16 lanes j of x
// (rounding.h), the same operations lane by lane.
FO_AVX512_INLINE __m512 f16_stochastic16_avx512(__m512 x, uint64_t stream, int64_t first) {
  const __m512i bits = rounding_bits16_avx512(stream, first);
  const __m512i u = _mm512_castps_si512(x);
  const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  // Every lane in float16's normal range, [2^-14, 65504) (the usual vector): the normal
  // case alone, on the signed bits (the magnitude plus 13 random bits stays below the
  // sign bit).
  const __mmask16 all_normal = _mm512_cmplt_epu32_mask(
      _mm512_sub_epi32(magnitude, _mm512_set1_epi32(0x38800000)),  // 2^-14
      _mm512_set1_epi32(0x477FE000 - 0x38800000));                  // 65504
  if (__builtin_expect(all_normal == 0xFFFF, 1)) {
    return _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_add_epi32(u, _mm512_srli_epi32(bits, 19)), _mm512_set1_epi32(~0x1FFF)));
  }
  const __m512i sign = _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512 a = _mm512_castsi512_ps(magnitude);
  // float16's normal range
  const __m512 normal = _mm512_castsi512_ps(_mm512_and_si512(
      _mm512_add_epi32(magnitude, _mm512_srli_epi32(bits, 19)), _mm512_set1_epi32(~0x1FFF)));
  // subnormals (min(scaled, 1024) is 1024 for a NaN, as the scalar comparison makes it)
  const __m512 s = _mm512_min_ps(_mm512_mul_ps(a, _mm512_set1_ps(0x1p24f)), _mm512_set1_ps(1024.0f));
  const __m512 low = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(s));
  const __m512 u24 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bits, 8)),
                                   _mm512_set1_ps(0x1p-24f));
  const __mmask16 up = _mm512_cmp_ps_mask(u24, _mm512_sub_ps(s, low), _CMP_LT_OQ);
  const __m512 sub = _mm512_mul_ps(_mm512_mask_add_ps(low, up, low, _mm512_set1_ps(1.0f)),
                                   _mm512_set1_ps(0x1p-24f));
  const __mmask16 is_normal = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-14f), _CMP_GE_OQ);
  const __m512 r = _mm512_mask_mov_ps(sub, is_normal, normal);
  const __m512 signed_r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
  const __mmask16 finite = _mm512_cmp_ps_mask(a, _mm512_set1_ps(65504.0f), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(x, finite, signed_r);  // overflow, infinities, NaN: to nearest
}
// The same for x[j], j < 16.
FO_AVX512_INLINE void bf16_stochastic16_avx512(const float* x, uint16_t* dst, uint64_t stream,
                                               int64_t first) {
  bf16_stochastic16_avx512(_mm512_loadu_ps(x), dst, stream, first);
}
#pragma GCC diagnostic pop
#endif

// Elements [at, at + m) of a tensor of dtype `dt` (float32, bfloat16, float16, or uint8: an
// 8-bit state with its block scales) as floats, and stored back from floats (rounded to
// nearest, or quantized). An 8-bit block starts at a multiple of kQuantBlock.
template <Isa kIsa>
FO_INLINE void load_block_impl(at::ScalarType dt, const void* base, int64_t at, float* dst,
                               int64_t m, const float* scales) {
  switch (dt) {
    case at::kBFloat16:
      widen_block_isa<c10::BFloat16, kIsa>(static_cast<const c10::BFloat16*>(base) + at, dst, m);
      return;
    case at::kHalf:
      widen_block_isa<c10::Half, kIsa>(static_cast<const c10::Half*>(base) + at, dst, m);
      return;
    case at::kByte: {
      const uint8_t* codes = static_cast<const uint8_t*>(base) + at;
      const float scale = scales[at / kQuantBlock];
#if FO_X86_CLONES
      if constexpr (kIsa >= Isa::kAvx512) return q8_dequantize_avx512(codes, scale, dst, m);
      if constexpr (kIsa == Isa::kAvx2) return q8_dequantize_avx2(codes, scale, dst, m);
#endif
      return q8_dequantize_baseline(codes, scale, dst, m);
    }
    default: std::memcpy(dst, static_cast<const float*>(base) + at, static_cast<size_t>(m) * 4);
  }
}
template <Isa kIsa>
FO_INLINE void store_block_impl(at::ScalarType dt, const float* src, void* base, int64_t at,
                                int64_t m, float* scales) {
  switch (dt) {
    case at::kBFloat16:
      narrow_block_isa<c10::BFloat16, kIsa>(src, static_cast<c10::BFloat16*>(base) + at, m);
      return;
    case at::kHalf:
      narrow_block_isa<c10::Half, kIsa>(src, static_cast<c10::Half*>(base) + at, m);
      return;
    case at::kByte: {
      uint8_t* codes = static_cast<uint8_t*>(base) + at;
      float* scale = scales + at / kQuantBlock;
#if FO_X86_CLONES
      if constexpr (kIsa >= Isa::kAvx512) return q8_quantize_avx512(src, codes, scale, m);
      if constexpr (kIsa == Isa::kAvx2) return q8_quantize_avx2(src, codes, scale, m);
#endif
      return q8_quantize_baseline(src, codes, scale, m);
    }
    default: std::memcpy(static_cast<float*>(base) + at, src, static_cast<size_t>(m) * 4);
  }
}

// Note [storage blocks out of line]
// The storage loops call load_block and store_block for the param, the grad, each state and
// the mode's buffer of every block. Inlined (the copies' `flatten`), each call site was a
// copy of every dtype's conversion loops, in every rule's storage loop of every ISA: 86% of
// sgd.o's 4.5 MB of code was storage loops. They are one out-of-line copy per ISA instead
// (multi_tensor.cpp), as the 8-bit block functions were: one call per block of kBlock
// elements and stream, the same instructions inside, so the same bits. On an AMD EPYC (Zen
// 4, 2 cores) the build went from 610 s to 264 s, sgd.o from 4.5 to 1.4 MB; the storage
// loops' steps (float32 params with bfloat16 or 8-bit state, AdamW, 2^24 elements, 1
// thread, old and new builds alternated) were within the machine's noise of each other.
#define FO_DECLARE_BLOCK_FNS(isa)                                                           \
  void load_block_##isa(at::ScalarType dt, const void* base, int64_t at, float* dst,        \
                        int64_t m, const float* scales);                                     \
  void store_block_##isa(at::ScalarType dt, const float* src, void* base, int64_t at,       \
                         int64_t m, float* scales);
FO_DECLARE_BLOCK_FNS(baseline)
#if FO_X86_CLONES
FO_DECLARE_BLOCK_FNS(avx2)
FO_DECLARE_BLOCK_FNS(avx512)
FO_DECLARE_BLOCK_FNS(avx512bf16)
#endif
#undef FO_DECLARE_BLOCK_FNS

template <Isa kIsa>
FO_INLINE void load_block(at::ScalarType dt, const void* base, int64_t at, float* dst,
                          int64_t m, const float* scales) {
#if FO_X86_CLONES
  if constexpr (kIsa == Isa::kAvx512Bf16) return load_block_avx512bf16(dt, base, at, dst, m, scales);
  if constexpr (kIsa == Isa::kAvx512) return load_block_avx512(dt, base, at, dst, m, scales);
  if constexpr (kIsa == Isa::kAvx2) return load_block_avx2(dt, base, at, dst, m, scales);
#endif
  return load_block_baseline(dt, base, at, dst, m, scales);
}
template <Isa kIsa>
FO_INLINE void store_block(at::ScalarType dt, const float* src, void* base, int64_t at,
                           int64_t m, float* scales) {
#if FO_X86_CLONES
  if constexpr (kIsa == Isa::kAvx512Bf16) return store_block_avx512bf16(dt, src, base, at, m, scales);
  if constexpr (kIsa == Isa::kAvx512) return store_block_avx512(dt, src, base, at, m, scales);
  if constexpr (kIsa == Isa::kAvx2) return store_block_avx2(dt, src, base, at, m, scales);
#endif
  return store_block_baseline(dt, src, base, at, m, scales);
}

// The rule over a block of m floats: the param, grad and states (up to 3) each in a
// buffer of the storage loop or, for float32 lists, in the tensor itself. They never
// overlap: __restrict lets the compiler vectorize without checking.
// With AVX2 or AVX-512 the rule runs on vectors of floats (Note [vector rules] in simd.h:
// the same bits, and the rules' vector forms, such as Adam's division by a constant, are
// faster than what the compiler makes of the scalar rule), the tail on floats.
// side(i, p), where given, runs at the start of each vector iteration, i its first element
// (the storage loop's quantization of the block before, Note [8-bit state a block behind],
// or its stochastic rounding of the vector before, Note [stochastic rounding in step]; p
// is passed so that what side reads of it is read through p); returns where the vectors
// ended.
struct NoSide {
  FO_INLINE void operator()(int64_t, const float*) const {}
};
template <typename Rule, Isa kIsa, typename Side = NoSide>
FO_INLINE int64_t rule_block(const typename Rule::Coeffs& c, float* __restrict p,
                             const float* __restrict g,
                             float* __restrict s0, float* __restrict s1, float* __restrict s2,
                             int64_t m, const Side& side = Side{}) {
  constexpr int NS = Rule::kStates;
  static_assert(NS <= 3);
  int64_t i = 0;
#if FO_VECTOR_RULES
  using V = std::conditional_t<kIsa >= Isa::kAvx512, F32x16,
                               std::conditional_t<kIsa == Isa::kAvx2, F32x8, float>>;
  if constexpr (!std::is_same_v<V, float>) {
    constexpr int64_t kWidth = sizeof(V) / sizeof(float);
    const typename Rule::template WithMath<V> vrule(c);
    for (; i + kWidth <= m; i += kWidth) {
      side(i, p);
      V pv = V::load(p + i);
      V sv[NS > 0 ? NS : 1];
      if constexpr (NS > 0) sv[0] = V::load(s0 + i);
      if constexpr (NS > 1) sv[1] = V::load(s1 + i);
      if constexpr (NS > 2) sv[2] = V::load(s2 + i);
      vrule(pv, V::load(g + i), sv);
      pv.store(p + i);
      if constexpr (NS > 0) sv[0].store(s0 + i);
      if constexpr (NS > 1) sv[1].store(s1 + i);
      if constexpr (NS > 2) sv[2].store(s2 + i);
    }
  }
#endif
  const int64_t vector_end = i;
  const Rule rule(c);
  for (; i < m; ++i) {
    float pv = p[i];
    float sv[NS > 0 ? NS : 1];
    if constexpr (NS > 0) sv[0] = s0[i];
    if constexpr (NS > 1) sv[1] = s1[i];
    if constexpr (NS > 2) sv[2] = s2[i];
    rule(pv, g[i], sv);
    p[i] = pv;
    if constexpr (NS > 0) s0[i] = sv[0];
    if constexpr (NS > 1) s1[i] = sv[1];
    if constexpr (NS > 2) s2[i] = sv[2];
  }
  return vector_end;
}

// The loop over one segment of a tensor whose lists do not all share the param's dtype
// (Note [state storage] in plan.h: state_dtype) or whose 16-bit param is kept in one of
// the storage modes (Note [param storage]): kBlock elements at a time, each list widened
// to float as its dtype says (the param from its master copy, or plus its compensation),
// updated by the rule, and stored as its dtype and the mode say. The rule's math is that
// of the other loops, so only the storage of what it reads and writes changes. Each step
// is its own loop over the block, so that the compiler vectorizes it; whether the grads
// are unscaled is decided at run time (a scale of 1 would change no value), and the dtypes
// are read at run time, so that one copy per rule and ISA serves every combination.
// Elements [from, to) of a tensor of `elem`-byte elements asked for (Note [software
// prefetch]).
template <int kWrite>
FO_INLINE void prefetch_elements(const void* base, int64_t elem, int64_t from, int64_t to) {
  const char* c = static_cast<const char*>(base);
  for (int64_t o = from * elem; o < to * elem; o += 64) __builtin_prefetch(c + o, kWrite);
}
// How far ahead the streams are asked for, in elements of `elem` bytes: the bytes of
// cpu_tuning().prefetch_ahead floats (0 on the CPUs where prefetch was measured to cost).
FO_INLINE int64_t prefetch_distance(int64_t elem) {
  return cpu_tuning().prefetch_ahead * static_cast<int64_t>(sizeof(float)) / elem;
}

// Note [software prefetch] for the storage loops: the kBlock elements `ahead` past element
// `done` of every stream of a block (param and grad of psize bytes an element, the rule's
// states of ssize[k], the mode's compensation or float32 master), where ahead > 0 and they
// are in the tensor.
template <int NS>
FO_INLINE void prefetch_storage_ahead(const TensorPtrs& t, const void* comp, const float* master,
                                      int64_t psize, const int64_t* ssize, int64_t done,
                                      int64_t ahead) {
  if (ahead <= 0 || done + ahead >= t.numel) return;
  const int64_t from = done + ahead, to = std::min(t.numel, from + kBlock);
  prefetch_elements<1>(t.param, psize, from, to);
  prefetch_elements<0>(t.grad, psize, from, to);
  for (int k = 0; k < NS; ++k) prefetch_elements<1>(t.state[k], ssize[k], from, to);
  if (comp != nullptr) prefetch_elements<1>(comp, psize, from, to);
  if (master != nullptr) prefetch_elements<1>(master, 4, from, to);
}

// Note [master follows the param] (plan.h) for the storage loop's block of m masters, from
// element b of the 16-bit param: each master that does not round to the param's bits takes
// the param's value (scratch: m floats).
template <Isa kIsa>
FO_INLINE void master_follows_param(at::ScalarType pt, const void* param, int64_t b,
                                    float* master, int64_t m, float* scratch) {
  alignas(64) uint16_t rounded[kBlock];
  store_block<kIsa>(pt, master, rounded, 0, m, nullptr);
  const uint16_t* bits = static_cast<const uint16_t*>(param) + b;
  bool edited = false;
  for (int64_t i = 0; i < m; ++i) edited |= rounded[i] != bits[i];
  if (!edited) return;
  load_block<kIsa>(pt, param, b, scratch, m, nullptr);
  for (int64_t i = 0; i < m; ++i) {
    if (rounded[i] != bits[i]) master[i] = scratch[i];
  }
}

#if FO_X86_CLONES
// Note [storage modes in registers]
// Kahan summation and master weights of 16-bit params, in the copies with a vector math
// type for that dtype (Note [vector rules]: bfloat16 with AVX512-BF16, float16 with AVX2
// or AVX-512), and their stochastic rounding with AVX-512 (bfloat16: AVX512-BF16): each
// vector of elements widened, updated and stored in registers, as the 16-bit segment loop
// does, instead of through the storage loop's float buffers (whose extra passes over each
// block made Kahan 73%, master weights 78% and stochastic rounding 56% of the limit on the
// Xeon, W4-like). The same for states of another float dtype than the param's
// (state_dtype: float32 params with bfloat16 or float16 moments, 16-bit params with float32
// ones, in any mode; Note [state storage] in plan.h): the buffers' passes made float32
// AdamW with bfloat16 moments 82% of the limit on the Xeon (2026-12-06). The same
// operations in the same order as the storage loop below, lane by lane (stochastic
// rounding: bf16_stochastic16_avx512 and f16_stochastic16_avx512, element i with its own
// bits; the storage loop's float16 rounding is left to the compiler, which did not
// vectorize it: 14% of the limit, W4-like, on the Xeon): the same bits. T is the param's
// (and grad's) type, S the states'; the vector type is the one of the copy that converts
// both (none: the storage loop does it all). Returns where its vectors ended (begin where
// it does not apply); the storage loop does the rest.
template <typename T, typename S, Isa kIsa>
struct StorageMathOf {
  using PV = VectorMath<T, kIsa>;
  using SV = VectorMath<S, kIsa>;
  using type = std::conditional_t<
      std::is_same_v<T, float>, SV,
      std::conditional_t<std::is_same_v<S, float> || std::is_same_v<PV, SV>, PV, float>>;
};

template <typename Rule, Isa kIsa, typename T, typename S>
FO_INLINE int64_t mode_vectors(const TensorPtrs& t, int64_t begin, int64_t end, ParamMode mode,
                               float inv_scale, bool unscale) {
  using V = typename StorageMathOf<T, S, kIsa>::type;
  if constexpr (!std::is_class_v<V>) {
    return begin;
  } else {
    constexpr int NS = Rule::kStates;
    constexpr int64_t kWidth = sizeof(V) / sizeof(float);
    constexpr bool kFloatParam = std::is_same_v<T, float>;
    // Under MXCSR.DAZ the vector bfloat16 stores cannot see subnormals (simd.h).
    // (pick_storage_fn takes the baseline copy where the calling thread has DAZ set; this
    // is for a worker thread of torch's pool whose MXCSR says otherwise.)
    if ((std::is_same_v<T, c10::BFloat16> || std::is_same_v<S, c10::BFloat16>) && daz_is_set()) {
      return begin;
    }
    const StorageCoeffs& sc = *static_cast<const StorageCoeffs*>(t.coeffs);
    const typename Rule::template WithMath<V> vrule(
        *static_cast<const typename Rule::Coeffs*>(sc.rule_coeffs));
    const V vinv_scale(inv_scale);
    T* p = static_cast<T*>(t.param);
    T* g = static_cast<T*>(t.grad);
    S* st[NS > 0 ? NS : 1];
    for (int k = 0; k < NS; ++k) st[k] = static_cast<S*>(t.state[k]);
    T* comp = mode == ParamMode::kKahan ? static_cast<T*>(t.state[NS]) : nullptr;
    float* master = mode == ParamMode::kMaster ? static_cast<float*>(t.state[NS]) : nullptr;
    constexpr bool kStochastic = std::is_same_v<T, c10::BFloat16> ? kIsa >= Isa::kAvx512Bf16
                                 : std::is_same_v<T, c10::Half>   ? kIsa >= Isa::kAvx512
                                                                  : false;
    if (!kStochastic && mode == ParamMode::kStochastic) return begin;
    const uint64_t stream = sc.rounding_stream;
    const int64_t vend = begin + (end - begin) / kWidth * kWidth;
    const int64_t ahead = prefetch_distance(sizeof(T));
    int64_t ssize[NS > 0 ? NS : 1];
    for (int k = 0; k < NS; ++k) ssize[k] = sizeof(S);
    for (int64_t b = begin; b < vend; b += kBlock) {
      const int64_t bend = std::min(vend, b + kBlock);
      prefetch_storage_ahead<NS>(t, comp, master, sizeof(T), ssize, bend, ahead);
      for (int64_t i = b; i < bend; i += kWidth) {
        V pv;
        if constexpr (kFloatParam) {
          pv = V::load(p + i);
        } else {
          // (Note [master follows the param] in plan.h)
          pv = master != nullptr ? V::load(master + i).following(p + i) : V::load(p + i);
          if (comp != nullptr) pv = pv + V::load(comp + i);
        }
        V gv = V::load(g + i);
        if (unscale) {
          gv = gv * vinv_scale;
          gv.store(g + i);  // the unscaled grad, stored back
          if constexpr (!kFloatParam) gv = V::load(g + i);  // Note [the unscaled grad as stored]
        }
        V sv[NS > 0 ? NS : 1];
        for (int k = 0; k < NS; ++k) sv[k] = V::load(st[k] + i);
        vrule(pv, gv, sv);
        for (int k = 0; k < NS; ++k) sv[k].store(st[k] + i);
        if constexpr (kStochastic) {
          if (mode == ParamMode::kStochastic) {  // Note [stochastic rounding] in rounding.h
            if constexpr (std::is_same_v<T, c10::BFloat16>) {
              bf16_stochastic16_avx512(pv.v, reinterpret_cast<uint16_t*>(p + i), stream, i);
            } else {  // (a float16 value, which the store keeps)
              V(f16_stochastic16_avx512(pv.v, stream, i)).store(p + i);
            }
            continue;
          }
        }
        if constexpr (kFloatParam) {
          pv.store(p + i);  // (a float32 param has no mode)
        } else if (master != nullptr) {
          pv.store(p + i);
          pv.store(master + i);
        } else if (comp != nullptr) {
          (pv - pv.store_widened(p + i)).store(comp + i);  // exact: what rounding lost
        } else {
          pv.store(p + i);  // rounded to nearest
        }
      }
    }
    return vend;
  }
}

// Note [storage modes in registers]: the copy of mode_vectors for the param's dtype and
// the states' (all of one float dtype, or no states), where there is one.
template <typename Rule, Isa kIsa>
FO_INLINE int64_t storage_vectors(const TensorPtrs& t, int64_t begin, int64_t end,
                                  ParamMode mode, float inv_scale, bool unscale) {
  constexpr int NS = Rule::kStates;
  const at::ScalarType pt = t.param_dtype;
  const at::ScalarType sdt = NS > 0 ? t.state_dtype[0] : pt;
  for (int k = 1; k < NS; ++k) {
    if (t.state_dtype[k] != sdt) return begin;
  }
  using BF = c10::BFloat16;
  using H = c10::Half;
  if (pt == at::kBFloat16) {
    if (sdt == at::kBFloat16) return mode_vectors<Rule, kIsa, BF, BF>(t, begin, end, mode, inv_scale, unscale);
    if (sdt == at::kFloat) return mode_vectors<Rule, kIsa, BF, float>(t, begin, end, mode, inv_scale, unscale);
  } else if (pt == at::kHalf) {
    if (sdt == at::kHalf) return mode_vectors<Rule, kIsa, H, H>(t, begin, end, mode, inv_scale, unscale);
    if (sdt == at::kFloat) return mode_vectors<Rule, kIsa, H, float>(t, begin, end, mode, inv_scale, unscale);
  } else if (pt == at::kFloat && mode == ParamMode::kNearest) {
    if (sdt == at::kBFloat16) return mode_vectors<Rule, kIsa, float, BF>(t, begin, end, mode, inv_scale, unscale);
    if (sdt == at::kHalf) return mode_vectors<Rule, kIsa, float, H>(t, begin, end, mode, inv_scale, unscale);
  }
  return begin;
}
#endif

template <typename Rule, Isa kIsa>
FO_INLINE void storage_loop(const TensorPtrs& t, int64_t begin, int64_t end) {
  using M = float;
  constexpr int NS = Rule::kStates;
  const StorageCoeffs& sc = *static_cast<const StorageCoeffs*>(t.coeffs);
  const auto& coeffs = *static_cast<const typename Rule::Coeffs*>(sc.rule_coeffs);
  const M inv_scale = static_cast<M>(t.inv_grad_scale);
  const bool unscale = t.inv_grad_scale != 1.0;
  const at::ScalarType pt = t.param_dtype;
  const ParamMode mode = sc.mode;
  void* comp = mode == ParamMode::kKahan ? t.state[NS] : nullptr;
  float* master = mode == ParamMode::kMaster ? static_cast<float*>(t.state[NS]) : nullptr;
  // float32 lists are updated in place; the others go through these buffers.
  alignas(64) M pbuf[kBlock];
  alignas(64) M gbuf[kBlock];
  alignas(64) M sbuf[NS > 0 ? NS : 1][kBlock];
  alignas(64) M hb[kBlock];  // Kahan: the param as stored, widened
#if FO_X86_CLONES
  // Note [storage modes in registers]
  if constexpr (kIsa >= Isa::kAvx2) {
    begin = storage_vectors<Rule, kIsa>(t, begin, end, mode, inv_scale, unscale);
  }
#endif
  const bool p_direct = pt == at::kFloat && mode == ParamMode::kNearest;
  bool s_direct[NS > 0 ? NS : 1];
  for (int k = 0; k < NS; ++k) s_direct[k] = t.state_dtype[k] == at::kFloat;
  // Note [software prefetch]: where the CPU gains from it, every stream a block reads or
  // writes, as many bytes of the param ahead as the segment loops ask for.
  const int64_t psize = static_cast<int64_t>(c10::elementSize(pt));
  const int64_t ahead = prefetch_distance(psize);
  int64_t ssize[NS > 0 ? NS : 1];
  for (int k = 0; k < NS; ++k) ssize[k] = static_cast<int64_t>(c10::elementSize(t.state_dtype[k]));
#if FO_X86_CLONES
  // Note [8-bit state a block behind]
  // Where every state is 8-bit, with AVX-512, a block's states are quantized while the
  // rule runs on the next block: the rule's vector loop makes 16 codes of each state of
  // the block before in each of its iterations. The rule is bound by its divisions and
  // square roots, the quantization by its gathers and integer work, and apart each waited
  // for the other (AdamW, float32 params, one thread: about as long in each). The states'
  // buffers alternate between two halves, so a block's floats stay until their codes are
  // made; the tensor's last block, which may be short, is quantized at once, and what
  // waits at the end of the segment is quantized then. A block's codes and scale are
  // those of store_block's q8_quantize_avx512: only when they are made changes.
  constexpr bool kBehind = kIsa >= Isa::kAvx512 && NS > 0;
  bool behind = kBehind;
  for (int k = 0; k < NS; ++k) behind = behind && t.state_dtype[k] == at::kByte;
  alignas(64) M sbuf_other[kBehind ? NS : 1][kBehind ? kBlock : 1];
  Q8Block waiting[NS > 0 ? NS : 1] = {};  // (codes null: none)
  bool other_half = false;
#endif
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t m = std::min(kBlock, end - b);
    prefetch_storage_ahead<NS>(t, comp, master, psize, ssize, b + m, ahead);
    M* pb = p_direct ? static_cast<float*>(t.param) + b : pbuf;
    M* gb = pt == at::kFloat ? static_cast<float*>(t.grad) + b : gbuf;
    M* sb[NS > 0 ? NS : 1] = {};
    for (int k = 0; k < NS; ++k) sb[k] = s_direct[k] ? static_cast<float*>(t.state[k]) + b : sbuf[k];
#if FO_X86_CLONES
    if constexpr (kBehind) {
      if (behind && other_half) {
        for (int k = 0; k < NS; ++k) sb[k] = sbuf_other[k];
      }
    }
#endif
    if (mode == ParamMode::kMaster) {
      pb = master + b;  // (updated in place)
      master_follows_param<kIsa>(pt, t.param, b, pb, m, hb);
    } else if (!p_direct) {
      load_block<kIsa>(pt, t.param, b, pb, m, nullptr);
      if (mode == ParamMode::kKahan) {
        load_block<kIsa>(pt, comp, b, hb, m, nullptr);
        for (int64_t i = 0; i < m; ++i) pb[i] = pb[i] + hb[i];
      }
    }
    if (pt != at::kFloat) load_block<kIsa>(pt, t.grad, b, gb, m, nullptr);
    if (unscale) {
      for (int64_t i = 0; i < m; ++i) gb[i] = gb[i] * inv_scale;
      // the unscaled grad, stored back, and its stored value used (Note [the unscaled grad
      // as stored])
      if (pt != at::kFloat) {
        store_block<kIsa>(pt, gb, t.grad, b, m, nullptr);
        load_block<kIsa>(pt, t.grad, b, gb, m, nullptr);
      }
    }
    for (int k = 0; k < NS; ++k) {
      if (!s_direct[k]) load_block<kIsa>(t.state_dtype[k], t.state[k], b, sb[k], m, t.state_scale[k]);
    }
    M* s1 = nullptr;  // (the states a rule does not have)
    M* s2 = nullptr;
    if constexpr (NS > 1) s1 = sb[1];
    if constexpr (NS > 2) s2 = sb[2];
    bool stored = false;
#if FO_X86_CLONES
    if constexpr (kBehind) {
      if (behind) {  // Note [8-bit state a block behind]
        // (a copy, so that the compiler need not reload it after each store of codes)
        Q8Block w[NS];
        for (int k = 0; k < NS; ++k) w[k] = waiting[k];
        const auto codes_before = [&](int64_t i, const float*) {
          for (int k = 0; k < NS; ++k) {
            if (w[k].codes != nullptr) q8_codes16_avx512(w[k], i);
          }
        };
        const int64_t done = rule_block<Rule, kIsa>(coeffs, pb, gb, sb[0], s1, s2, m, codes_before);
        for (int k = 0; k < NS; ++k) {
          if (w[k].codes != nullptr) q8_codes_avx512(w[k], done, kBlock);  // (whole blocks wait)
          uint8_t* codes = static_cast<uint8_t*>(t.state[k]) + b;
          float* scale = t.state_scale[k] + b / kQuantBlock;
          if (q8_begin_avx512(sb[k], codes, scale, m, &waiting[k]) && m < kBlock) {
            q8_codes_avx512(waiting[k], 0, m);  // the tensor's last block: at once
            waiting[k] = Q8Block{};
          }
        }
        other_half = !other_half;
        stored = true;
      }
    }
#endif
    bool rounded = false;
    if (!stored) {
#if FO_X86_CLONES
      if constexpr (kIsa >= Isa::kAvx512) {
        rounded = mode == ParamMode::kStochastic && pt == at::kBFloat16;
      }
#endif
      if (rounded) {
#if FO_X86_CLONES
        if constexpr (kIsa >= Isa::kAvx512) {  // (as `rounded` says)
          // Note [stochastic rounding in step]
          // bfloat16 params rounded stochastically, with AVX-512: each vector of the rule's
          // results is rounded in the rule's next iteration (the hash's integer multiplies
          // beside the rule's divisions, where one loop after the other waited for each),
          // the last vector and the tail after the loop; the same bits as the loop in the
          // switch below (bf16_stochastic16_avx512).
          uint16_t* pp = reinterpret_cast<uint16_t*>(static_cast<c10::BFloat16*>(t.param) + b);
          const uint64_t stream = sc.rounding_stream;
          const auto round_before = [&](int64_t i, const float* p) {
            if (i > 0) bf16_stochastic16_avx512(p + i - 16, pp + i - 16, stream, b + i - 16);
          };
          const int64_t done =
              rule_block<Rule, kIsa>(coeffs, pb, gb, sb[0], s1, s2, m, round_before);
          for (int64_t j = std::max<int64_t>(done - 16, 0); j < m; ++j) {
            const uint32_t bits = rounding_bits(stream, static_cast<uint64_t>(b + j));
            pp[j] = bf16_stochastic_bits(pb[j], bits);
          }
        }
#endif
      } else {
        rule_block<Rule, kIsa>(coeffs, pb, gb, sb[0], s1, s2, m);
      }
      for (int k = 0; k < NS; ++k) {
        if (!s_direct[k]) store_block<kIsa>(t.state_dtype[k], sb[k], t.state[k], b, m, t.state_scale[k]);
      }
    }
    switch (mode) {
      case ParamMode::kMaster:
        store_block<kIsa>(pt, pb, t.param, b, m, nullptr);
        break;
      case ParamMode::kKahan:
        store_block<kIsa>(pt, pb, t.param, b, m, nullptr);
        load_block<kIsa>(pt, t.param, b, hb, m, nullptr);
        for (int64_t i = 0; i < m; ++i) hb[i] = pb[i] - hb[i];  // exact: what rounding lost
        store_block<kIsa>(pt, hb, comp, b, m, nullptr);
        break;
      case ParamMode::kStochastic: {  // Note [stochastic rounding] in rounding.h
        if (rounded) break;  // (Note [stochastic rounding in step])
        const uint64_t stream = sc.rounding_stream;
        if (pt == at::kBFloat16) {
          c10::BFloat16* p = static_cast<c10::BFloat16*>(t.param) + b;
          for (int64_t i = 0; i < m; ++i) {
            p[i].x = bf16_stochastic_bits(pb[i], rounding_bits(stream, static_cast<uint64_t>(b + i)));
          }
        } else {
          for (int64_t i = 0; i < m; ++i) {
            hb[i] = f16_stochastic_float(pb[i], rounding_bits(stream, static_cast<uint64_t>(b + i)));
          }
          store_block<kIsa>(pt, hb, t.param, b, m, nullptr);
        }
        break;
      }
      default:
        if (!p_direct) store_block<kIsa>(pt, pb, t.param, b, m, nullptr);
    }
  }
#if FO_X86_CLONES
  if constexpr (kBehind) {
    static_assert(kBlock == kQuantBlock);
    for (int k = 0; k < NS; ++k) {
      if (waiting[k].codes != nullptr) q8_codes_avx512(waiting[k], 0, kBlock);
    }
  }
#endif
}

template <typename Rule>
void storage_baseline(const TensorPtrs& t, int64_t begin, int64_t end) {
  storage_loop<Rule, Isa::kBaseline>(t, begin, end);
}
#if FO_X86_CLONES
template <typename Rule>
FO_AVX2_TARGET void storage_avx2(const TensorPtrs& t, int64_t begin, int64_t end) {
  storage_loop<Rule, Isa::kAvx2>(t, begin, end);
}
template <typename Rule>
FO_AVX512_TARGET void storage_avx512(const TensorPtrs& t, int64_t begin, int64_t end) {
  storage_loop<Rule, Isa::kAvx512>(t, begin, end);
}
// (bfloat16 blocks widened and rounded in vectors: widen_block_isa, narrow_block_isa)
template <typename Rule>
FO_AVX512BF16_TARGET void storage_avx512bf16(const TensorPtrs& t, int64_t begin, int64_t end) {
  storage_loop<Rule, Isa::kAvx512Bf16>(t, begin, end);
}
#endif

// Under MXCSR.DAZ (torch.set_flush_denormal(True) on the calling thread) the baseline copy:
// there a comparison sees a subnormal as 0, and where an amsgrad maximum meets a
// subnormal and a zero, which of the two it keeps is the instruction's choice (the
// vector blend and the compiled scalar code chose differently: the every-bit-pattern test
// of the storage modes in tests/test_behaviour.py).
template <typename Rule>
SegmentFn pick_storage_fn() {
#if FO_X86_CLONES
  if (daz_is_set()) return &storage_baseline<Rule>;
  switch (cpu_isa()) {
    case Isa::kAvx512Bf16: return &storage_avx512bf16<Rule>;
    case Isa::kAvx512: return &storage_avx512<Rule>;
    case Isa::kAvx2: return &storage_avx2<Rule>;
    case Isa::kBaseline: break;
  }
#endif
  return &storage_baseline<Rule>;
}

template <typename T, bool kUnscale, typename Rule>
void segment_baseline(const TensorPtrs& t, int64_t begin, int64_t end) {
  segment_loop<T, kUnscale, Rule, Isa::kBaseline>(t, begin, end);
}

#if FO_X86_CLONES
template <typename T, bool kUnscale, typename Rule>
FO_AVX2_TARGET void segment_avx2(const TensorPtrs& t, int64_t begin, int64_t end) {
  segment_loop<T, kUnscale, Rule, Isa::kAvx2>(t, begin, end);
}
template <typename T, bool kUnscale, typename Rule>
FO_AVX512_TARGET void segment_avx512(const TensorPtrs& t, int64_t begin, int64_t end) {
  segment_loop<T, kUnscale, Rule, Isa::kAvx512>(t, begin, end);
}
template <typename T, bool kUnscale, typename Rule>
FO_AVX512BF16_TARGET void segment_avx512bf16(const TensorPtrs& t, int64_t begin, int64_t end) {
  segment_loop<T, kUnscale, Rule, Isa::kAvx512Bf16>(t, begin, end);
}
#endif

template <typename T, bool kUnscale, typename Rule>
SegmentFn pick_segment_fn() {
#if FO_X86_CLONES
  // (Note [float loops in AVX2]: float32 and float64 params)
  constexpr bool kLoadBound = [] {
    if constexpr (requires { Rule::kLoadBound; }) return Rule::kLoadBound;
    return false;
  }();
  switch (std::is_same_v<T, at::opmath_type<T>> ? float_loop_isa(kLoadBound) : cpu_isa()) {
    case Isa::kAvx512Bf16:
      // Only bfloat16 loops differ from the AVX-512 ones: one copy fewer of the rest.
      if constexpr (std::is_same_v<T, c10::BFloat16>) return &segment_avx512bf16<T, kUnscale, Rule>;
      return &segment_avx512<T, kUnscale, Rule>;
    case Isa::kAvx512: return &segment_avx512<T, kUnscale, Rule>;
    case Isa::kAvx2: return &segment_avx2<T, kUnscale, Rule>;
    case Isa::kBaseline: break;
  }
#endif
  return &segment_baseline<T, kUnscale, Rule>;
}

// The CPU loop of (T, Rule) for the select_* functions of rule_select.h.
struct PickSegment {
  bool unscale;  // a GradScaler's grads: unscaled (and stored back) first
  // The plan's storage_loop cases (MultiTensorPlan::mixed_storage: Note [param storage],
  // Note [state storage]).
  bool mixed = false;
  template <typename T, typename Rule>
  SegmentFn operator()() const {
    if (mixed) {
      // (The plan refused every other dtype.)
      // (Complex params take neither; their kFmaVariant rules have no storage loop.)
      if constexpr (std::is_same_v<at::opmath_type<T>, float> && Rule::kFmaVariant) {
        return pick_storage_fn<Rule>();  // (unscales at run time)
      } else {
        TORCH_CHECK(false, "fused_optim: a param storage mode or state_dtype applies to "
                    "float32, bfloat16 and float16 params only");
      }
    }
    return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
  }
};

// Runs fns[i] over tensor i of the plan with coefficient struct coeffs[i], all tensors in
// one parallel region, then writes back the plan's layout temporaries.
void run(MultiTensorPlan& plan, const std::vector<SegmentFn>& fns,
         const std::vector<const void*>& coeffs, double inv_grad_scale);

// The segment function of each tensor of a plan: `select(real dtype, is complex)`, looked
// up once per run of neighbours of the same kind.
template <typename Select>
std::vector<SegmentFn> segment_fns(const MultiTensorPlan& plan, Select&& select) {
  const int64_t n = plan.size();
  std::vector<SegmentFn> fns(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::ScalarType dt = plan.real_dtype(i);
    const bool cplx = plan.is_complex(i);
    const bool same_kind = i > 0 && dt == plan.real_dtype(i - 1) && cplx == plan.is_complex(i - 1);
    fns[i] = same_kind ? fns[i - 1] : select(dt, cplx);
  }
  return fns;
}

// The end of every binding: runs the loops `select(real dtype, is complex)` picks, with
// one coefficient struct for every tensor: `coeffs` at lr (the step is not used).
template <typename Coeffs, typename Select>
void run_shared(MultiTensorPlan& plan, Coeffs coeffs, double lr, double inv_grad_scale,
                Select&& select) {
  coeffs.at(lr, false, 0.0);
  const std::vector<const void*> coeff_ptrs(plan.size(), &coeffs);
  run(plan, segment_fns(plan, select), coeff_ptrs, inv_grad_scale);
}

// The same with coeffs[i] for tensor i.
template <typename Coeffs, typename Select>
void run_each(MultiTensorPlan& plan, const std::vector<Coeffs>& coeffs, double inv_grad_scale,
              Select&& select) {
  const int64_t n = plan.size();
  std::vector<const void*> coeff_ptrs(n);
  for (int64_t i = 0; i < n; ++i) coeff_ptrs[i] = &coeffs[i];
  run(plan, segment_fns(plan, select), coeff_ptrs, inv_grad_scale);
}

// The same with each tensor's coefficients at its step, as counted by this call (Note
// [per-step coefficients]).
template <typename Coeffs, typename Select>
void run_per_step(MultiTensorPlan& plan, at::TensorList state_steps, const Coeffs& base,
                  double lr, bool lr_is_f32, double inv_grad_scale, Select&& select) {
  run_each(plan, per_step_coeffs(base, lr, lr_is_f32, increment_steps(state_steps)),
           inv_grad_scale, select);
}

}  // namespace fused_optim::cpu
