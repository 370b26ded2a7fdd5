#pragma once
// Note [8-bit state]
// state_dtype=torch.uint8 keeps an optimizer's moments block-quantized, as in Dettmers et
// al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022): each block of kQuantBlock
// consecutive elements (in the order the loops walk a contiguous tensor) has one float32
// scale, its absolute maximum, and each element is one byte, the index of the nearest
// value of a 256-entry map of [-1, 1] (the signed map) or [0, 1] (the unsigned map).
// The maps are the paper's dynamic tree maps, made here from their definition:
//   signed: 0, 1, and for i = 0..6, j = 0..2^i - 1: +-10^(i-6) * (0.1 + (j + 0.5) * 0.9 / 2^i)
//   unsigned: 0, 1, and for i = 0..6, j = 0..2^(i+1) - 1:
//     10^(i-6) * (0.1 + (j + 0.5) * 0.9 / 2^(i+1))
// each value computed in double in that order of operations and rounded to float, sorted.
// A block takes the unsigned map when none of its values is negative (second moments
// always, first moments where a block happens to be), and records the choice in the sign
// of its scale: absmax for the signed map, -absmax (-0.0 included) for the unsigned one.
// Quantizing a block of floats v (the update's results, in registers, never a full-size
// temporary): absmax = max |v| (NaN if any v is NaN); x = v / absmax (IEEE division; 0 where
// absmax is not > 0); code = the number of thresholds t_c < x, where t_c is the midpoint
// of map values c and c + 1, computed in double and rounded to float (so ties go to the
// lower value). Dequantizing: v = map[code] * |scale|. A NaN or an infinity in a block
// makes the whole block NaN (its scale is NaN, its codes those of 0), as a NaN moment
// poisons that element's updates in torch (an infinite moment does too, within a step or
// two: inf / inf in Adam's update, inf - inf in the param). An infinite absmax has no
// scale that keeps the block's finite values (0 * inf is NaN), and x = v / inf is NaN for
// the infinite v, whose code would depend on the NaN's sign bits (x86's division and the
// GPU's give different ones): until 2026-12-06 the CPU stored +inf as -inf or NaN and
// fused_optim/quantization.py as +inf.
// The update itself is computed in float from the dequantized moments; what it stores is
// the quantization of its results. fused_optim/quantization.py is the same in Python (for
// checkpoint conversion), and tests/test_state_dtype.py has its own reference. The AVX-512
// copies compute the same codes faster, and quantize a block while the rule runs on the
// next: Notes [8-bit quantization on AVX-512], [8-bit without division] and [8-bit state a
// block behind] in multi_tensor.h, [8-bit dequantization by byte permutes] in
// multi_tensor.cpp.

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>

// q8_bucket and q8_code are also the CUDA kernels' (cuda/multi_tensor.cuh: Note [8-bit
// state on CUDA]), on a device copy of the maps: one copy of how a code is found.
#if defined(__CUDACC__)
#define FO_Q8_HD __host__ __device__
#else
#define FO_Q8_HD
#endif

namespace fused_optim::cpu {

constexpr int64_t kQuantBlock = 256;

struct Quant8Maps {
  float value[2][256];      // [0]: signed, [1]: unsigned; ascending
  float threshold[2][256];  // 255 midpoints each (the last entry unused)
  // Note [quantization by table]: the code of x in [-1, 1] from one lookup. x's bucket is
  // the float's top 16 bits (q8_bucket; one shift): its sign, exponent and 7 bits of
  // significand. For |x| <= 1 bit 30 is 0, so the bucket's bit 14 is too; the buckets with
  // it set (|x| >= 2, infinities and NaN, which a block's x never is but where its
  // absmax is infinite) hold what the same bits with bit 14 clear hold, as they did when
  // the bucket dropped bit 30. No bucket holds more than one threshold (checked as the
  // table is made). entry[u][b]: bits 0-7, c0, the number of thresholds below the
  // bucket's smallest float; bits 8-24, L, where the code is c0 + (y > L) with y x's low
  // 16 bits, inverted for a negative x (within a bucket, x > t compares the low bits, in
  // reverse below zero); L = 0xFFFF where no threshold can be below x. A code is at most
  // 255 (there are 255 thresholds), so it is also the low byte of entry + (y > L).
  uint32_t entry[2][65536];
};

// x's bucket: its top 16 bits.
FO_Q8_HD inline __attribute__((always_inline)) uint32_t q8_bucket(uint32_t bits) { return bits >> 16; }

inline Quant8Maps make_quant8_maps() {
  Quant8Maps maps{};
  const double p10[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
  for (int u = 0; u < 2; ++u) {
    double v[256];
    int n = 0;
    for (int i = 0; i < 7; ++i) {
      const int items = 1 << (i + u);  // 2^i signed, 2^(i+1) unsigned
      for (int j = 0; j < items; ++j) {
        const double mean = (0.1 + ((j + 0.5) * 0.9) / items) * p10[i];
        v[n++] = mean;
        if (u == 0) v[n++] = -mean;
      }
    }
    v[n++] = 0.0;
    v[n++] = 1.0;
    float f[256];
    for (int k = 0; k < 256; ++k) f[k] = static_cast<float>(v[k]);
    // (insertion sort: 256 distinct values, once per process)
    for (int a = 1; a < 256; ++a) {
      const float x = f[a];
      int b = a - 1;
      for (; b >= 0 && f[b] > x; --b) f[b + 1] = f[b];
      f[b + 1] = x;
    }
    for (int k = 0; k < 256; ++k) maps.value[u][k] = f[k];
    for (int k = 0; k < 255; ++k) {
      maps.threshold[u][k] =
          static_cast<float>((static_cast<double>(f[k]) + static_cast<double>(f[k + 1])) / 2.0);
    }
    maps.threshold[u][255] = INFINITY;
    for (uint32_t b = 0; b < 65536; ++b) {
      const bool negative = (b & 0x8000) != 0;
      const uint32_t lo = (b & 0x3FFF) << 16, hi = lo | 0xFFFF;  // (bit 30 as 0)
      float flo, fhi;
      std::memcpy(&flo, &lo, 4);
      std::memcpy(&fhi, &hi, 4);
      // the bucket's smallest and largest floats
      const float smallest = negative ? -fhi : flo, largest = negative ? -flo : fhi;
      const float* t = maps.threshold[u];
      const int below = static_cast<int>(std::lower_bound(t, t + 255, smallest) - t);
      const int inside = static_cast<int>(std::lower_bound(t, t + 255, largest) - t) - below;
      if (inside > 1) std::abort();  // (the maps' spacing rules it out)
      uint32_t limit = 0xFFFF;
      if (inside == 1) {
        uint32_t tb;
        std::memcpy(&tb, &t[below], 4);
        limit = negative ? 0xFFFF - (tb & 0xFFFF) : (tb & 0xFFFF);
      }
      maps.entry[u][b] = static_cast<uint32_t>(below) | (limit << 8);
    }
  }
  return maps;
}

// The code of x (Note [quantization by table]): the number of thresholds t_c < x.
FO_Q8_HD inline __attribute__((always_inline)) int q8_code(float x, const uint32_t* entry) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t e = entry[q8_bucket(bits)];
  const uint32_t y = (bits & 0xFFFF) ^ ((bits >> 31) * 0xFFFF);
  return static_cast<int>((e & 0xFF) + (y > (e >> 8)));
}

inline const Quant8Maps& quant8_maps() {
  static const Quant8Maps maps = make_quant8_maps();
  return maps;
}

// A block's map and scale from what its values hold (Note [8-bit state]): the signed map
// where one is negative, NaN or infinite, else the unsigned one, recorded in the scale's
// sign; a NaN or an infinity makes amax, and so the scale, NaN. Returns the map's lookup
// table (Note [quantization by table]).
inline const uint32_t* q8_block_map(float& amax, bool negative, bool nan, float* scale) {
  nan |= std::isinf(amax);  // (amax is the largest |v|: infinite where a v is)
  if (nan) amax = NAN;
  const int u = (negative || nan) ? 0 : 1;
  *scale = u ? -amax : amax;
  return quant8_maps().entry[u];
}

// A block of m <= kQuantBlock codes with its scale, as floats.
inline __attribute__((always_inline)) void q8_dequantize(const uint8_t* codes, float scale,
                                                         float* dst, int64_t m) {
  const Quant8Maps& maps = quant8_maps();
  const float* value = maps.value[std::signbit(scale) ? 1 : 0];
  const float a = std::fabs(scale);
  for (int64_t i = 0; i < m; ++i) dst[i] = value[codes[i]] * a;
}

// A block of m <= kQuantBlock floats quantized: its codes and its scale.
inline __attribute__((always_inline)) void q8_quantize(const float* src, uint8_t* codes,
                                                       float* scale, int64_t m) {
  float amax = 0.0f;
  bool negative = false, nan = false;
  for (int64_t i = 0; i < m; ++i) {
    const float a = std::fabs(src[i]);
    amax = a > amax ? a : amax;
    negative |= src[i] < 0.0f;
    nan |= src[i] != src[i];
  }
  const uint32_t* entry = q8_block_map(amax, negative, nan, scale);
  const bool divide = amax > 0.0f;
  for (int64_t i = 0; i < m; ++i) {
    codes[i] = static_cast<uint8_t>(q8_code(divide ? src[i] / amax : 0.0f, entry));
  }
}

}  // namespace fused_optim::cpu
