#pragma once
// Note [vector rules]
// The bfloat16 loops of the AVX512-BF16 copy run the update rules of update_rules.h on
// F32x16, sixteen floats in one AVX-512 register, instead of on float: the rules are
// templates over their math type, and F32x16 has the operations they use (+ - * /, unary
// minus, and the fma_, sqrt_ and maximum_ overloads below), each one exactly rounded
// IEEE operation, lane by lane, as the scalar float version does. So the bits are the
// same; tests/test_behaviour.py checks it against the baseline loops, special values
// included.
//
// Why: compiled from scalar code, the bfloat16 loops round each stored value with c10's
// integer round-to-nearest-even (about eight vector instructions a value), and bf16 Adam
// was bound by vector-instruction throughput, not by memory. vcvtneps2bf16 does the same
// rounding in one instruction, except for NaN (c10 stores 0x7FC0; the instruction keeps
// sign and payload) and float subnormals (the instruction flushes them to zero): vectors
// holding any of those (vfpclassps, which ignores MXCSR.DAZ) take c10's integer rounding.

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "update_rules.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FO_AVX512BF16_CLONES 1
#include <immintrin.h>
#else
#define FO_AVX512BF16_CLONES 0
#endif

#if FO_AVX512BF16_CLONES
#define FO_AVX512BF16_ISA "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c"
// Not always_inline: GCC refuses that into the rules' functions, which have no target
// attribute. The flatten attribute of the AVX512-BF16 segment loops inlines everything
// they call, these functions included, so no __m512 is ever passed to a call.
#define FO_VEC_INLINE inline __attribute__((target(FO_AVX512BF16_ISA)))

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fused_optim {
namespace cpu {
struct F32x16;
}
template <>
struct ScalarOf<cpu::F32x16> {
  using type = float;
};
}  // namespace fused_optim

namespace fused_optim::cpu {

struct F32x16 {
  __m512 v;
  F32x16() = default;
  FO_VEC_INLINE explicit F32x16(__m512 x) : v(x) {}
  // A rule's scalar, rounded to float once (as static_cast<float>), in every lane.
  FO_VEC_INLINE explicit F32x16(double d) : v(_mm512_set1_ps(static_cast<float>(d))) {}
  FO_VEC_INLINE explicit F32x16(float f) : v(_mm512_set1_ps(f)) {}
};

FO_VEC_INLINE F32x16 operator+(F32x16 a, F32x16 b) { return F32x16(_mm512_add_ps(a.v, b.v)); }
FO_VEC_INLINE F32x16 operator-(F32x16 a, F32x16 b) { return F32x16(_mm512_sub_ps(a.v, b.v)); }
FO_VEC_INLINE F32x16 operator*(F32x16 a, F32x16 b) { return F32x16(_mm512_mul_ps(a.v, b.v)); }
FO_VEC_INLINE F32x16 operator/(F32x16 a, F32x16 b) { return F32x16(_mm512_div_ps(a.v, b.v)); }
// Negation flips the sign bit only, as for a float (NaN included).
FO_VEC_INLINE F32x16 operator-(F32x16 a) {
  return F32x16(_mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN))));
}
// Found by argument-dependent lookup from the rules, before the scalar templates.
FO_VEC_INLINE F32x16 fma_(F32x16 a, F32x16 b, F32x16 c) {
  return F32x16(_mm512_fmadd_ps(a.v, b.v, c.v));
}
// (maskz with every lane: _mm512_sqrt_ps trips the same GCC 12 warning.)
FO_VEC_INLINE F32x16 sqrt_(F32x16 a) { return F32x16(_mm512_maskz_sqrt_ps(0xFFFF, a.v)); }
// maximum_ of update_rules.h lane by lane: a where a > b or a is NaN, else b.
FO_VEC_INLINE F32x16 maximum_(F32x16 a, F32x16 b) {
  const __mmask16 take_a = _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ) |
                           _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return F32x16(_mm512_mask_blend_ps(take_a, b.v, a.v));
}

// Integer lanes as GNU vectors: shifts and width conversions on these compile to the
// same instructions as the intrinsics, without GCC 12's false -Wmaybe-uninitialized
// warnings about the intrinsics' _mm512_undefined_epi32 (GCC bug 105593).
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

// Sixteen bfloat16 values widened to float (exact: a shift).
FO_VEC_INLINE F32x16 load_bf16x16(const c10::BFloat16* p) {
  // (maskz with every lane: __builtin_convertvector splits it in two halves here.)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const U32x16 w = reinterpret_cast<U32x16>(_mm512_maskz_cvtepu16_epi32(0xFFFF, h));
  return F32x16(reinterpret_cast<__m512>(w << 16));
}

// c10's rounding (narrow() in multi_tensor.h) for sixteen lanes: round to nearest even on
// the bits, and 0x7FC0 for NaN.
FO_VEC_INLINE U16x16 round_bf16x16_c10(__m512 x) {
  const U32x16 bits = reinterpret_cast<U32x16>(x);
  U32x16 r = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  r = reinterpret_cast<U32x16>(_mm512_mask_mov_epi32(reinterpret_cast<__m512i>(r),
                                                     _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                                     _mm512_set1_epi32(0x7FC0)));
  return __builtin_convertvector(r, U16x16);
}

// Sixteen floats rounded to bfloat16 as c10 rounds them (Note [vector rules]).
FO_VEC_INLINE void store_bf16x16(F32x16 x, c10::BFloat16* p) {
  constexpr int kQuietNan = 0x01, kSubnormal = 0x20, kSignalingNan = 0x80;
  U16x16 r = reinterpret_cast<U16x16>(_mm512_cvtneps_pbh(x.v));
  if (__builtin_expect(_mm512_fpclass_ps_mask(x.v, kQuietNan | kSubnormal | kSignalingNan) != 0, 0)) {
    r = round_bf16x16_c10(x.v);
  }
  std::memcpy(p, &r, sizeof(r));
}

}  // namespace fused_optim::cpu

#pragma GCC diagnostic pop
#endif  // FO_AVX512BF16_CLONES
