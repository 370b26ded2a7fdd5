#pragma once
// Note [vector rules]
// The 16-bit loops of the vector copies (float16 with AVX2 or AVX-512, bfloat16 with
// AVX512-BF16) run the update rules of update_rules.h on F32x8 or F32x16, eight or
// sixteen floats in one register, instead of on float: the rules are templates over their
// math type, and these types have the operations the rules use (+ - * /, unary minus, and
// the fma_, sqrt_, abs_, maximum_, if_less_, if_equal_, negated_if_, div_by_ and
// div_by_bias_correction_ overloads below), each one exactly rounded IEEE operation (or a
// sign flip), lane by lane, as the scalar float
// version does (div_by_ in two steps: Note [division by a constant]). So the bits are the
// same; tests/test_behaviour.py checks it against the baseline loops on every 16-bit input.
//
// Why: compiled from scalar code, the bfloat16 loops round each stored value with c10's
// integer round-to-nearest-even (about eight vector instructions a value), and bf16 Adam
// was bound by vector-instruction throughput, not by memory. vcvtneps2bf16 does the same
// rounding in one instruction (W4 Adam: ~10-15% faster), except for NaN (c10 stores
// 0x7FC0; the instruction keeps sign and payload) and float subnormals (the instruction
// flushes them to zero): vectors holding any of those (vfpclassps) take c10's integer
// rounding. Under MXCSR.DAZ vfpclassps sees subnormals as zero (measured here), and FTZ
// does not stop an amsgrad maximum from passing a loaded subnormal through, so there the
// scalar loop runs instead (daz_is_set, checked once per segment). The float16 loops used
// to convert blocks into float buffers and back (F16C) around a scalar loop, and ran at
// 0.7x torch's fused=True (AdamW, 4 x 16M elements); vcvtph2ps and vcvtps2ph now convert
// in registers (twice as fast), with c10's NaN (sign | 0x7E00) where the instruction
// would keep the payload.
//
// Limits of "the same bits": the rounding mode is the default one (vcvtps2ph rounds to
// nearest even whatever MXCSR.RC says; c10's float16 conversion follows it); and where an
// operation meets two NaNs, which one's sign and payload the result keeps is the
// compiler's choice of operand order (it shows in float16, float and double results;
// bfloat16 stores every NaN as 0x7FC0).

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "update_rules.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FO_VECTOR_RULES 1
#include <immintrin.h>
#else
#define FO_VECTOR_RULES 0
#endif

namespace fused_optim::cpu {

// c10's roundings to 16 bits, on integer lanes: a uint32_t/uint16_t in the scalar loops
// (narrow() in multi_tensor.h), a GNU vector of them in the vector stores below. No
// target attribute: they take their caller's ISA.

// bfloat16: the float's bits rounded to nearest even (c10 stores every NaN as 0x7FC0;
// the callers see to that).
template <typename U32>
FO_INLINE U32 round_bf16_bits(U32 bits) {
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// float16: c10::Half stores every NaN as sign | 0x7E00, where F16C (and c10::Half built
// with -mf16c) keeps the payload. The NaN lanes (magnitude above infinity's, 0x7C00) of
// rounded results are set the c10 way.
template <typename U16>
FO_INLINE U16 c10_nans_f16(U16 h) {
  return (h & 0x7FFF) > 0x7C00 ? (h & 0x8000) | 0x7E00 : h;
}

}  // namespace fused_optim::cpu

#if FO_VECTOR_RULES
// The ISAs of the vector copies of the loops (Note [ISA dispatch] in multi_tensor.h).
#define FO_AVX2_ISA "avx2,fma,f16c"
#define FO_AVX512_ISA "avx512f,avx512vl,avx512bw,avx512dq," FO_AVX2_ISA
#define FO_AVX512BF16_ISA FO_AVX512_ISA ",avx512bf16"
// Not always_inline: GCC refuses that into the rules' functions, which have no target
// attribute. The flatten attribute of the segment loops inlines everything they call,
// these functions included, so no vector is ever passed to a call.
#define FO_AVX2_INLINE inline __attribute__((target(FO_AVX2_ISA)))
#define FO_AVX512_INLINE inline __attribute__((target(FO_AVX512_ISA)))
#define FO_AVX512BF16_INLINE inline __attribute__((target(FO_AVX512BF16_ISA)))

namespace fused_optim {
namespace cpu {
struct F32x8;
struct F32x16;
}  // namespace cpu
template <>
struct ScalarOf<cpu::F32x8> {
  using type = float;
};
template <>
struct ScalarOf<cpu::F32x16> {
  using type = float;
};
}  // namespace fused_optim

namespace fused_optim::cpu {

// Integer lanes as GNU vectors: shifts and width conversions on these compile to the
// same instructions as the intrinsics, without GCC 12's false -Wmaybe-uninitialized
// warnings about the AVX-512 intrinsics' _mm512_undefined_* (GCC bug 105593; for the
// same reason some AVX-512 intrinsics below are the maskz form with every lane).
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

// MXCSR's denormals-are-zero bit (torch.set_flush_denormal(True) sets it, on the calling
// thread).
inline bool daz_is_set() { return (_mm_getcsr() & 0x0040u) != 0; }

// ---- eight floats (AVX2, FMA, F16C) ------------------------------------------------------
struct F32x8 {
  __m256 v;
  F32x8() = default;
  FO_AVX2_INLINE explicit F32x8(__m256 x) : v(x) {}
  // A rule's scalar, rounded to float once (as static_cast<float>), in every lane.
  FO_AVX2_INLINE explicit F32x8(double d) : v(_mm256_set1_ps(static_cast<float>(d))) {}
  FO_AVX2_INLINE explicit F32x8(float f) : v(_mm256_set1_ps(f)) {}

  static FO_AVX2_INLINE F32x8 load(const float* p) { return F32x8(_mm256_loadu_ps(p)); }
  FO_AVX2_INLINE void store(float* p) const { _mm256_storeu_ps(p, v); }
  // float16: F16C both ways (exact widening; rounding to nearest even), c10's NaNs.
  static FO_AVX2_INLINE F32x8 load(const c10::Half* p) {
    return F32x8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  FO_AVX2_INLINE void store(c10::Half* p) const { (void)store_widened(p); }
  // The same store, returning what was stored, widened (as load(p) would read it back).
  FO_AVX2_INLINE F32x8 store_widened(c10::Half* p) const {
    U16x8 r = reinterpret_cast<U16x8>(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0, 0)) {
      r = c10_nans_f16(r);
    }
    std::memcpy(p, &r, sizeof(r));
    return F32x8(_mm256_cvtph_ps(reinterpret_cast<__m128i>(r)));
  }
  // Note [master follows the param] (plan.h): this vector of masters, except the lanes
  // that do not round to the float16 param's bits at p (as store() rounds, c10's NaNs
  // included), which take the param's value (a rare branch: only after an edit).
  FO_AVX2_INLINE F32x8 following(const c10::Half* p) const {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i r = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    __m128i same = _mm_cmpeq_epi16(r, h);
    if (__builtin_expect(_mm_movemask_epi8(same) == 0xFFFF, 1)) return *this;
    same = _mm_cmpeq_epi16(reinterpret_cast<__m128i>(c10_nans_f16(reinterpret_cast<U16x8>(r))), h);
    return F32x8(_mm256_blendv_ps(_mm256_cvtph_ps(h), v,
                                  _mm256_castsi256_ps(_mm256_cvtepi16_epi32(same))));
  }
};

FO_AVX2_INLINE F32x8 operator+(F32x8 a, F32x8 b) { return F32x8(_mm256_add_ps(a.v, b.v)); }
FO_AVX2_INLINE F32x8 operator-(F32x8 a, F32x8 b) { return F32x8(_mm256_sub_ps(a.v, b.v)); }
FO_AVX2_INLINE F32x8 operator*(F32x8 a, F32x8 b) { return F32x8(_mm256_mul_ps(a.v, b.v)); }
FO_AVX2_INLINE F32x8 operator/(F32x8 a, F32x8 b) { return F32x8(_mm256_div_ps(a.v, b.v)); }
// Negation flips the sign bit only, as for a float (NaN included).
FO_AVX2_INLINE F32x8 operator-(F32x8 a) {
  return F32x8(_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)));
}
// Found by argument-dependent lookup from the rules, before the scalar templates.
FO_AVX2_INLINE F32x8 fma_(F32x8 a, F32x8 b, F32x8 c) {
  return F32x8(_mm256_fmadd_ps(a.v, b.v, c.v));
}
FO_AVX2_INLINE F32x8 sqrt_(F32x8 a) { return F32x8(_mm256_sqrt_ps(a.v)); }
// The sign bit cleared, as for a float (NaN included).
FO_AVX2_INLINE F32x8 abs_(F32x8 a) { return F32x8(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)); }
// maximum_ of update_rules.h lane by lane: a where a > b or a is NaN, else b.
FO_AVX2_INLINE F32x8 maximum_(F32x8 a, F32x8 b) {
  const __m256 take_a =
      _mm256_or_ps(_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ), _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  return F32x8(_mm256_blendv_ps(b.v, a.v, take_a));
}

// if_less_ of update_rules.h lane by lane: a where x < y, else b (NaN: b).
FO_AVX2_INLINE F32x8 if_less_(F32x8 x, F32x8 y, F32x8 a, F32x8 b) {
  return F32x8(_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, y.v, _CMP_LT_OQ)));
}
// if_equal_ of update_rules.h lane by lane: a where x == y, else b (NaN: b).
FO_AVX2_INLINE F32x8 if_equal_(F32x8 x, F32x8 y, F32x8 a, F32x8 b) {
  return F32x8(_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, y.v, _CMP_EQ_OQ)));
}
// negated_if_ of update_rules.h lane by lane: g's sign bit flipped where grad_sign's is set.
FO_AVX2_INLINE F32x8 negated_if_(F32x8 grad_sign, F32x8 g) {
  return F32x8(_mm256_xor_ps(g.v, _mm256_and_ps(grad_sign.v, _mm256_set1_ps(-0.0f))));
}

// ---- sixteen floats (AVX-512; bfloat16 with AVX512-BF16) ------------------------------
struct F32x16 {
  __m512 v;
  F32x16() = default;
  FO_AVX512_INLINE explicit F32x16(__m512 x) : v(x) {}
  FO_AVX512_INLINE explicit F32x16(double d) : v(_mm512_set1_ps(static_cast<float>(d))) {}
  FO_AVX512_INLINE explicit F32x16(float f) : v(_mm512_set1_ps(f)) {}

  static constexpr int kQuietNan = 0x01, kSubnormal = 0x20, kSignalingNan = 0x80;  // vfpclassps

  static FO_AVX512_INLINE F32x16 load(const float* p) { return F32x16(_mm512_loadu_ps(p)); }
  FO_AVX512_INLINE void store(float* p) const { _mm512_storeu_ps(p, v); }

  static FO_AVX512_INLINE F32x16 load(const c10::BFloat16* p) {
    return widened(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // vcvtneps2bf16, or where a lane is NaN or subnormal, c10's rounding on the integer
  // lanes: to nearest even, and 0x7FC0 for NaN.
  FO_AVX512BF16_INLINE void store(c10::BFloat16* p) const { (void)store_widened(p); }
  // The same store, returning what was stored, widened (as load(p) would read it back).
  FO_AVX512BF16_INLINE F32x16 store_widened(c10::BFloat16* p) const {
    const U16x16 r = bf16_bits();
    std::memcpy(p, &r, sizeof(r));
    return widened(reinterpret_cast<__m256i>(r));
  }
  // The bfloat16 bits that store() writes.
  FO_AVX512BF16_INLINE U16x16 bf16_bits() const {
    U16x16 r = reinterpret_cast<U16x16>(_mm512_cvtneps_pbh(v));
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, kQuietNan | kSubnormal | kSignalingNan) != 0, 0)) {
      const U32x16 bits = reinterpret_cast<U32x16>(v);
      const U32x16 nan = reinterpret_cast<U32x16>(
          _mm512_movm_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)));
      const U32x16 rounded = round_bf16_bits(bits);
      r = __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), U16x16);
    }
    return r;
  }
  // Sixteen bfloat16 values (their bits), widened exactly: each into the high half of its
  // float, the low half zero. One word permute with zero-masking (vpermw: the odd words
  // take h's words in order, the even ones are cleared) where a zero-extension and a
  // shift took two instructions. On a Zen 4 (2026-12-07) a micro-benchmark widening four
  // vectors and storing two ran 12% faster (8.2 -> 7.2 cycles per 16 elements); the rules'
  // bfloat16 loops, one thread in the L3 cache, Adamax 0.48-0.54 -> 0.46 ns an element and
  // SGD 0.14 -> 0.13, the others level within the noise. (__builtin_convertvector split the
  // old one in two halves.)
  static FO_AVX512_INLINE F32x16 widened(__m256i h) {
    const __m512i odd_words = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9,
                                               8, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    return F32x16(_mm512_castsi512_ps(
        _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, odd_words, _mm512_castsi256_si512(h))));
  }
  // Note [master follows the param] (plan.h): this vector of masters, except the lanes
  // that do not round to the param's bits at p (as store() rounds, c10's NaNs included),
  // which take the param's value (a rare branch: only after an edit).
  FO_AVX512BF16_INLINE F32x16 following(const c10::BFloat16* p) const {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __mmask16 differ = _mm256_cmpneq_epi16_mask(reinterpret_cast<__m256i>(bf16_bits()), h);
    if (__builtin_expect(differ == 0, 1)) return *this;
    return F32x16(_mm512_mask_blend_ps(differ, v, widened(h).v));
  }
  FO_AVX512_INLINE F32x16 following(const c10::Half* p) const {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i r = _mm512_maskz_cvtps_ph(0xFFFF, v, _MM_FROUND_TO_NEAREST_INT);
    __mmask16 differ = _mm256_cmpneq_epi16_mask(r, h);
    if (__builtin_expect(differ == 0, 1)) return *this;
    differ = _mm256_cmpneq_epi16_mask(
        reinterpret_cast<__m256i>(c10_nans_f16(reinterpret_cast<U16x16>(r))), h);
    return F32x16(_mm512_mask_blend_ps(differ, v, _mm512_maskz_cvtph_ps(0xFFFF, h)));
  }
  static FO_AVX512_INLINE F32x16 load(const c10::Half* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return F32x16(_mm512_maskz_cvtph_ps(0xFFFF, h));
  }
  FO_AVX512_INLINE void store(c10::Half* p) const { (void)store_widened(p); }
  // The same store, returning what was stored, widened (as load(p) would read it back).
  FO_AVX512_INLINE F32x16 store_widened(c10::Half* p) const {
    U16x16 r = reinterpret_cast<U16x16>(_mm512_maskz_cvtps_ph(0xFFFF, v, _MM_FROUND_TO_NEAREST_INT));
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, kQuietNan | kSignalingNan) != 0, 0)) {
      r = c10_nans_f16(r);
    }
    std::memcpy(p, &r, sizeof(r));
    return F32x16(_mm512_maskz_cvtph_ps(0xFFFF, reinterpret_cast<__m256i>(r)));
  }
};

FO_AVX512_INLINE F32x16 operator+(F32x16 a, F32x16 b) { return F32x16(_mm512_add_ps(a.v, b.v)); }
FO_AVX512_INLINE F32x16 operator-(F32x16 a, F32x16 b) { return F32x16(_mm512_sub_ps(a.v, b.v)); }
FO_AVX512_INLINE F32x16 operator*(F32x16 a, F32x16 b) { return F32x16(_mm512_mul_ps(a.v, b.v)); }
FO_AVX512_INLINE F32x16 operator/(F32x16 a, F32x16 b) { return F32x16(_mm512_div_ps(a.v, b.v)); }
FO_AVX512_INLINE F32x16 operator-(F32x16 a) {
  return F32x16(_mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN))));
}
FO_AVX512_INLINE F32x16 fma_(F32x16 a, F32x16 b, F32x16 c) {
  return F32x16(_mm512_fmadd_ps(a.v, b.v, c.v));
}
FO_AVX512_INLINE F32x16 sqrt_(F32x16 a) { return F32x16(_mm512_maskz_sqrt_ps(0xFFFF, a.v)); }
FO_AVX512_INLINE F32x16 abs_(F32x16 a) {
  return F32x16(_mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MAX))));
}
FO_AVX512_INLINE F32x16 maximum_(F32x16 a, F32x16 b) {
  const __mmask16 take_a = _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ) |
                           _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return F32x16(_mm512_mask_blend_ps(take_a, b.v, a.v));
}

FO_AVX512_INLINE F32x16 if_less_(F32x16 x, F32x16 y, F32x16 a, F32x16 b) {
  return F32x16(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, y.v, _CMP_LT_OQ), b.v, a.v));
}
FO_AVX512_INLINE F32x16 if_equal_(F32x16 x, F32x16 y, F32x16 a, F32x16 b) {
  return F32x16(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, y.v, _CMP_EQ_OQ), b.v, a.v));
}
FO_AVX512_INLINE F32x16 negated_if_(F32x16 grad_sign, F32x16 g) {
  const __m512i sign =
      _mm512_and_si512(_mm512_castps_si512(grad_sign.v), _mm512_set1_epi32(INT32_MIN));
  return F32x16(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g.v), sign)));
}

// Note [division by a constant]
// Adam divides sqrt(exp_avg_sq) by bias_correction2_sqrt, the same b for a whole tensor.
// On 16-bit params with AVX-512 that division's divider occupancy bounds the loop
// (multiplying instead, with wrong bits, made W4 Adam ~7% faster; this made it 6-8%
// faster). This gives the division's bits with a multiply and one correction
// (Markstein): with y = RN(1/b) and q = RN(a * y) (within an ulp of a/b), r = a - q * b is
// exact in an fma, and RN(q + r * y) is RN(a / b) (Markstein 1990; Muller et al.,
// Handbook of Floating-Point Arithmetic, on correcting a faithful quotient with a
// correctly rounded reciprocal), barring underflow and overflow. Here a = sqrt(x) is
// +-0, inf, NaN or in [2^-74.5, 2^64], and 2^-26.5 <= b <= 1 (bias_correction2_sqrt, as
// beta2 < 1 is a double), so q and r are normal, or r is 0. Lanes where r is 0 (q is
// exact, and keeps a -0's sign) or NaN (a is inf or NaN, and so is q, as a / b is) keep q.
// Outside that domain it is wrong: where a * y overflows, r is -inf and the result NaN.
// Checked exhaustively against _mm512_div_ps (2026-11-26): 312 divisors (Adam's for
// beta2 from 0 to 0.999999 and steps 1 to 10^6, 100 random ones in [2^-26.5, 1], 1 and
// its predecessor), every float a of that domain: no difference. The every-bit-pattern
// test of tests/test_behaviour.py compares the vector loops with the baseline's
// division.
FO_AVX512_INLINE F32x16 div_by_(F32x16 a, F32x16 b, F32x16 inv_b) {
  const __m512 q = _mm512_mul_ps(a.v, inv_b.v);
  const __m512 r = _mm512_fnmadd_ps(q, b.v, a.v);
  const __mmask16 correct = _mm512_cmp_ps_mask(r, _mm512_setzero_ps(), _CMP_NEQ_OQ);
  return F32x16(_mm512_mask3_fmadd_ps(r, inv_b.v, q, correct));
}

// Note [division by a bias correction]
// NAdam divides exp_avg_sq, any float, by bias_correction2 = 1 - beta2^step, in [2^-53, 1]
// (beta2 in [0, 1) is a double; rounded to float it stays in that range). div_by_ gives
// the division's bits where |a| is in [2^-100, 2^70] or a is 0: q = a * inv_b is then
// normal and at most 2^123, and the remainder r = a - q * b exactly representable (a
// multiple of 2^(e_a - 47) >= 2^-147 below 2^(e_a - 22), e_a being a's exponent), so
// Markstein's correction applies; a 0 gives r = 0 and keeps q, with a's sign. That q =
// RN(a * RN(1/b)) is within an ulp of a / b, which the correction needs, was checked
// (2026-12-02) for 30,000 random divisor significands and every dividend significand (all
// pairs of exponents in that domain give the same relative roundings): no quotient
// further than an ulp, none corrected wrong. A vector with a lane outside the domain
// (tiny, huge, inf or NaN) divides. The every-bit-pattern test of tests/test_behaviour.py
// compares NAdam's vector loops with the baseline's division.
FO_AVX512_INLINE F32x16 div_by_bias_correction_(F32x16 a, F32x16 b, F32x16 inv_b) {
  const __m512i bits = _mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MAX));
  constexpr uint32_t kLow = 0x0D800000u;   // 2^-100
  constexpr uint32_t kHigh = 0x62800000u;  // 2^70
  const __mmask16 in_domain =
      _mm512_testn_epi32_mask(bits, bits) |
      _mm512_cmple_epu32_mask(_mm512_sub_epi32(bits, _mm512_set1_epi32(kLow)),
                              _mm512_set1_epi32(kHigh - kLow));
  if (__builtin_expect(in_domain != 0xFFFF, 0)) return F32x16(_mm512_div_ps(a.v, b.v));
  return div_by_(a, b, inv_b);
}

}  // namespace fused_optim::cpu

#endif  // FO_VECTOR_RULES
