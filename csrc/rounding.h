#pragma once
// Stochastic rounding of float results to 16-bit storage, and its random numbers: one copy
// for the CPU loops and (later) the CUDA kernels, so both give the same bits.
//
// Note [stochastic rounding]
// A value x between two neighbouring 16-bit values lo < x < hi is stored as hi with
// probability (x - lo) / (hi - lo) and as lo otherwise, so the stored value is x on
// average: updates far below half a 16-bit ulp still move the param in expectation
// (round-to-nearest drops every one of them). The random bits come from a counter-based
// generator, never from a stream that threads would share: element i of a tensor at the
// optimizer's k-th step with it gets 32 bits
//     stream = mix64(seed + k * kGolden),  bits = hash32((i + hi(stream)) ^ lo(stream))
// (mix64: SplitMix64's output function, Steele, Lea and Flood, OOPSLA 2014, once per tensor
// and step; hash32 per element: below; one hash per element, not two nested: each
// multiply is two micro-ops on Intel's vector units, and one hash instead of two made the
// bf16 and fp16 stochastic rounding loops 7-10% faster on the project's Xeon), where `seed`
// is the param's own
// (state["rounding_state"][0], drawn from torch's generator when the optimizer was made)
// and k its counter (state["rounding_state"][1], counted by the kernel). i is the
// element's position in the param's memory. So a step's rounding depends only on the
// state, never on the thread count or on how the work is split, and a checkpoint resumes
// the same sequence. A shard of a param (FSDP2's DTensors) is rounded with the bits of the
// elements it holds: the optimizer passes [seed, counter, offset], offset the position of
// the shard's first element in the whole param, and the stream's high half is moved by
// it (shard_stream), since i enters the hash only as i + hi(stream). So a sharded run rounds
// as the unsharded one would, and no two shards of a param share their random numbers.
//   bfloat16: float's low 16 bits are exactly the part below a bfloat16 ulp, so adding 16
//     random bits to x's bit pattern and truncating rounds up with probability exactly
//     (x - lo) / ulp (the carry moves to the next magnitude: away from zero for either
//     sign). Infinities are kept, NaN becomes bfloat16's canonical NaN (as c10 rounds it);
//     a finite x above the largest bfloat16 rounds to it or to infinity.
//   float16: in its normal range (|x| >= 2^-14) float's low 13 bits are the part below a
//     float16 ulp: 13 random bits (the top ones) are added to x's magnitude and those 13
//     bits cleared, as for bfloat16 (exact). Below, on the subnormals' grid of 2^-24, the
//     fraction of an ulp, exact in float, is compared with 24 random bits (bits >> 8) as a
//     fraction of 1: P(hi) is exact where that fraction is a multiple of 2^-24 (|x| >=
//     2^-24) and off by less than 2^-24 below. Where x is not below float16's largest
//     finite value, 65504, in magnitude (overflow, infinities, NaN), it is rounded to
//     nearest, as c10::Half rounds it.

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FO_RND_HD __host__ __device__
#else
#define FO_RND_HD
#endif

namespace fused_optim {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// SplitMix64's output function.
FO_RND_HD inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A tensor's stream at a step: its seed and the step's counter.
FO_RND_HD inline uint64_t rounding_stream(uint64_t seed, uint64_t counter) {
  return mix64(seed + counter * kGolden);
}

// The stream of a shard whose first element is element `offset` of the whole param: the
// whole param's stream, its high half moved by the offset (mod 2^32, as rounding_bits adds).
FO_RND_HD inline uint64_t shard_stream(uint64_t stream, int64_t offset) {
  return stream + (static_cast<uint64_t>(static_cast<uint32_t>(offset)) << 32);
}

// A 32-bit integer hash with low bias (Wellons' "lowbias32"): a bijection, two
// multiplies, and vectorizable (32-bit lanes), where SplitMix64's 64-bit multiplies are not
// on most CPUs. A template so that the AVX-512 stochastic rounding runs the same code on
// a GNU vector of 16 lanes (multi_tensor.h's bf16_stochastic16_avx512).
template <typename U32>
FO_RND_HD inline U32 hash32(U32 x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// 32 random bits for element i of the stream.
FO_RND_HD inline uint32_t rounding_bits(uint64_t stream, uint64_t i) {
  const uint32_t lo = static_cast<uint32_t>(stream), hi = static_cast<uint32_t>(stream >> 32);
  return hash32((static_cast<uint32_t>(i) + hi) ^ lo);
}

FO_RND_HD inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// The bfloat16 bit pattern of x rounded stochastically with `bits` (its low 16 are used).
FO_RND_HD inline uint16_t bf16_stochastic_bits(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return 0x7FC0;                        // NaN
  if (magnitude == 0x7F800000u) return static_cast<uint16_t>(u >> 16);  // infinity
  return static_cast<uint16_t>((u + (bits & 0xFFFFu)) >> 16);
}

// x rounded stochastically to float16's grid, as a float (exactly a float16 value, which
// the caller rounds to float16 without change); `bits` as the note says. Integer and float
// operations only, no libm, so that the loops vectorize.
FO_RND_HD inline float f16_stochastic_float(float x, uint32_t bits) {
  // Both ways are computed and one is selected, so that the loops vectorize.
  const float a = std::fabs(x);
  const uint32_t u = float_bits(x);
  // float16's normal range: the low 13 bits of float's mantissa are below its ulp
  const uint32_t v = ((u & 0x7FFFFFFFu) + (bits >> 19)) & ~0x1FFFu;
  float normal;
  std::memcpy(&normal, &v, sizeof(normal));
  // subnormals: the grid is 2^-24; s < 2^10 is exact, and so are its parts
  const float scaled = a * 0x1p24f;
  const float s = scaled < 1024.0f ? scaled : 1024.0f;  // (not fminf: a libm call on x86)
  const float lo = static_cast<float>(static_cast<int32_t>(s));
  const float u24 = static_cast<float>(bits >> 8) * 0x1p-24f;
  // (arithmetic, not a branch: which way a random comparison goes is never predictable)
  const float sub = (lo + static_cast<float>(u24 < s - lo)) * 0x1p-24f;
  const float r = a >= 0x1p-14f ? normal : sub;
  const uint32_t rb = float_bits(r) | (u & 0x80000000u);
  float signed_r;
  std::memcpy(&signed_r, &rb, sizeof(signed_r));
  return a < 65504.0f ? signed_r : x;  // overflow, infinities, NaN: to nearest, by the caller
}

}  // namespace fused_optim
