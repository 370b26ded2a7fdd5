// Adafactor on the CPU: checks, layouts, scalars and three passes over the group's tensors.
// The per-element math is AdafactorRule in update_rules.h. Adafactor's update needs
// reductions (row and column means of the squared grads, the RMS of the param and of the
// unclipped update), so this is the second kind of kernel of the library, next to the
// elementwise loops of multi_tensor.h and the norms of grad_norm.cpp, not a special case
// inside either.
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "adafactor_plan.h"
#include "cpu/multi_tensor.h"
#include "plan.h"

namespace fused_optim::cpu {
namespace {

using adafactor::Entry;
using adafactor::kBuffer;
using adafactor::kLanes;
using adafactor::kOp;
using adafactor::kSumLanes;
using adafactor::Task;

// Note [Adafactor's passes]
// torch's for-loop computes, for each param in turn: alpha from the param's RMS; for a
// param of 2+ dims (a batch of m x n matrices, "slices") the row and column means of g*g
// (torch.norm over the last and second-to-last dims), lerped into row_var and col_var,
// then the variance estimate row_var @ col_var / row_var.mean(dim=-2) (clamped), the
// update g / sqrt(estimate) (clamped), and its RMS, which clips it. Each of these needs the
// one before over the whole param, so one call runs three passes over all tensors of the
// group (wave by wave: Note [Adafactor's waves]), each pass one parallel region
// (at::parallel_for over a list of tasks, so torch.set_num_threads governs it; run_tasks):
//   1. params of 2+ dims: each task is a block of rows of one slice. It reads g once and
//      sums g*g along each row (then lerps row_var) and down each column of its block.
//      A slice of one block (up to kRowBlock elements) then finishes its columns
//      (col_var, and the clamped mean of row_var) in the same task; the slices of several
//      blocks leave their column sums in a buffer, combined after the pass in block order
//      (a second short parallel region over those slices).
//   2. every param: each task (kChunk elements, whole rows of a slice) sums the squares of
//      its elements' updates (Note [Adafactor's update RMS]) and of the param
//      (alpha is computed from the param before the weight decay). Params of fewer than
//      2 dims read g first here, and compute their new `variance` without storing it. The
//      per-task sums are added per param after the pass, in task order, to make alpha and
//      denom.
//   3. every param: the update again, and param = param * (1 - lr * wd) - alpha/denom * u;
//      params of fewer than 2 dims store `variance` here (so with 16-bit params both
//      passes use its value before rounding, as torch's math in float would).
// Memory: g is read three times, the param twice and written once (the benchmark's
// pattern), and nothing of the params' size is allocated: the column sums of multi-block
// slices (kMaxColumnPartials per slice at most), the slice's column sums in a task of a
// one-block slice, a double per slice and two per task.
//
// Note [Adafactor's sums]
// Every sum is taken in double, in an order fixed by the shapes alone: a row sum by one
// task, element j in lane j % 8 (lanes added in order at the end of the row); a column sum
// down its rows within a block, the blocks then added in order; the RMS sums per task in
// lanes (element j of a row, or of a vector's task, in lane j % 16 of each run of 256),
// the lanes in order, then the tasks in order. The task lists depend only on the shapes, never on the
// thread count, so a step is bitwise the same at any number of threads. torch's reductions
// add in other orders (and in float for float params), so the sums differ from torch's by
// rounding, and with them everything downstream: tests/test_adafactor.py compares with
// torch's for-loop within a tolerance it justifies, and bitwise across thread counts.
// Each sum is rounded to the param's math type where torch's result has that dtype (the
// norms, the means), and the rest follows torch's ops and roundings (update_rules.h).
// Note [Adafactor's prefetch]
// Each task streams its rows (or elements) as the elementwise loops stream their segments,
// and where the CPU gains from software prefetch (Note [software prefetch] in
// multi_tensor.h; prefetch_distance is 0 on the CPUs where it was measured to cost) each
// pass asks for its streams' memory that far ahead of the chunk it is about to read, with
// the loops' prefetch_elements (on the project's Intel Xeon pass 1, which only reads the
// grads, went at about a third of the bandwidth without it). Near a task's end the
// prefetches run on past it, into the next rows or tensor, or past the end of an
// allocation, where a prefetch does nothing. A prefetch changes no result.
template <typename T, bool kUnscale>
FO_INLINE at::opmath_type<T> grad_value(T* g, at::opmath_type<T> inv_scale) {
  at::opmath_type<T> v = cpu::load(g);
  if constexpr (kUnscale) {
    store(v * inv_scale, g);  // the unscaled grad, stored back (as GradScaler.unscale_)
    v = cpu::load(g);
  }
  return v;
}

// Note [Adafactor's division by the row mean]
// Pass 3 divides each element's row_var * col_var by its slice's clamped row mean c, as
// torch's var_estimate.div_(...) does: a division per element, on the divider that the
// update's square root and its reciprocal (torch's rsqrt_) wait for too. On a Zen 4 that
// divider bounds pass 3 (a profile puts most of its samples behind the square root and the
// two divisions). Where the copy has FMA (AVX2 and AVX-512), pass 3 takes the quotient's
// bits from the multiplier instead: y = RN(1 / c) once per slice, q = RN(x * y), then two
// of Markstein's corrections q = RN(q + RN(x - q * c) * y) (the fma makes the remainder
// exact once q is within an ulp of x / c; the first correction brings it there, the second
// is then RN(x / c): Markstein 1990, as Note [division by a constant] in simd.h and Note
// [8-bit without division] in multi_tensor.h use it). That holds where nothing underflows
// or overflows: c in [2^-60, 2^60], and x = +0 (q stays +0, as +0 / c does) or x and x / c
// in [2^-99, 2^70]; the remainder is then a multiple of 2^-149 or more, exactly
// representable. A row whose factor, or a slice whose column factors, could put an
// element outside that (a negative factor, -0, NaN or infinity; a product or quotient
// beyond the bounds, from the row's factor and the extremes of the columns', in double)
// divides, as the baseline copy always does: every copy gives the same bits (the
// tests compare them on factors across every exponent).
constexpr double kReciprocalLow = 0x1p-99, kReciprocalHigh = 0x1p70;

FO_INLINE float div_by_reciprocal(float x, float c, float y) {
  float q = x * y;
  q = std::fma(std::fma(-q, c, x), y, q);
  return std::fma(std::fma(-q, c, x), y, q);
}

// What the rows of a slice need to know of its column factors and its clamped row mean c
// for the domain above.
struct SliceDomain {
  bool ok;            // c in [2^-60, 2^60], every column factor +0 or positive and finite
  double low, high;   // the smallest nonzero column factor (0: none) and the largest
  double c;
};

inline SliceDomain slice_domain(const float* col, int64_t n, float row_mean) {
  const double c = static_cast<double>(row_mean);
  float low = std::numeric_limits<float>::infinity(), high = 0.0f;
  bool ok = c >= 0x1p-60 && c <= 0x1p60;
  for (int64_t j = 0; j < n; ++j) {
    const float v = col[j];
    ok &= (v >= 0.0f) & !std::signbit(v) & (v <= std::numeric_limits<float>::max());
    low = v > 0.0f && v < low ? v : low;
    high = v > high ? v : high;
  }
  return {ok, std::isinf(low) ? 0.0 : static_cast<double>(low), static_cast<double>(high), c};
}

// Whether every element of a row with factor rv takes div_by_reciprocal (its division's
// bits) in slice s.
inline bool row_in_domain(float rv, const SliceDomain& s) {
  if (!s.ok || std::signbit(rv) || !(rv >= 0.0f) || !(rv <= std::numeric_limits<float>::max())) {
    return false;
  }
  if (rv == 0.0f || s.high == 0.0) return true;  // every x is +0
  const double lo = static_cast<double>(rv) * s.low, hi = static_cast<double>(rv) * s.high;
  return lo >= kReciprocalLow && lo / s.c >= kReciprocalLow && hi <= kReciprocalHigh &&
         hi / s.c <= kReciprocalHigh;
}

// Note [Adafactor's 16-bit factors]
// With 16-bit params the math runs in float and only stored values are rounded, as in the
// other kernels: the update of this step uses row_var and col_var as lerped, in float, not
// their 16-bit roundings. A call keeps those floats for the factored 16-bit params (one
// float per row and column of each slice: O(rows + cols), never O(rows * cols)).
template <typename T, bool kUnscale>
struct Passes {
  using M = at::opmath_type<T>;
  using Rule = AdafactorRule<M>;
  static constexpr bool kLow = !std::is_same_v<T, M>;

  // col_var of one slice from its column sums, and the clamped mean of its row_var.
  static FO_INLINE void finish_slice(const Entry& e, int64_t slice, const double* col_sums,
                                     double* row_means) {
    const Rule rule(e.c);
    const int64_t m = e.rows, n = e.cols;
    T* col = static_cast<T*>(e.col) + slice * n;
    for (int64_t j = 0; j < n; ++j) {
      const M v = rule.factor(cpu::load(col + j), Rule::mean_of_squares(col_sums[j], double(m)));
      store(v, col + j);
      if constexpr (kLow) e.col_f[slice * n + j] = v;
    }
    const M* row = adafactor::row_factors<T, M>(e) + slice * m;
    double sum = 0.0;
    for (int64_t r = 0; r < m; ++r) sum += static_cast<double>(row[r]);
    const M mean = static_cast<M>(sum) / static_cast<M>(m);  // row_var.mean(dim=-2)
    row_means[slice] = static_cast<double>(rule.clamp_row_mean(mean));
  }

  static FO_INLINE void pass1(const Entry& e, const Task& t, double* partials, double* row_means) {
    const Rule rule(e.c);
    const M inv = static_cast<M>(e.inv_grad_scale);
    const int64_t m = e.rows, n = e.cols;
    T* g = static_cast<T*>(e.g) + (t.slice * m + t.begin) * n;
    T* row = static_cast<T*>(e.row) + t.slice * m;
    std::vector<double> own;
    double* col;
    if (t.partial < 0) {
      own.assign(static_cast<size_t>(n), 0.0);
      col = own.data();
    } else {
      col = partials + t.partial;
      std::fill(col, col + n, 0.0);
    }
    const int64_t ahead = prefetch_distance(sizeof(T));
    for (int64_t r = t.begin; r < t.end; ++r, g += n) {
      double lanes[kLanes] = {};
      // (in chunks of kPrefetchChunk, a multiple of kLanes: the same sums in the same order)
      const int64_t full = n - n % kLanes;
      for (int64_t c = 0; c < full; c += kPrefetchChunk) {
        const int64_t chunk_end = std::min(full, c + kPrefetchChunk);
        if (ahead > 0) {
          prefetch_elements<kUnscale ? 1 : 0>(g + c + ahead, sizeof(T), 0, chunk_end - c);
        }
        for (int64_t j = c; j < chunk_end; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const double v = static_cast<double>(grad_value<T, kUnscale>(g + j + l, inv));
            const double sq = v * v;
            lanes[l] += sq;
            col[j + l] += sq;
          }
        }
      }
      int64_t j = full;
      for (int l = 0; j < n; ++j, ++l) {
        const double v = static_cast<double>(grad_value<T, kUnscale>(g + j, inv));
        const double sq = v * v;
        lanes[l] += sq;
        col[j] += sq;
      }
      double sum = lanes[0];
      for (int l = 1; l < kLanes; ++l) sum += lanes[l];
      const M v = rule.factor(cpu::load(row + r), Rule::mean_of_squares(sum, double(n)));
      store(v, row + r);
      if constexpr (kLow) e.row_f[t.slice * m + r] = v;
    }
    if (t.partial < 0) finish_slice(e, t.slice, col, row_means);
  }

  // lanes[j % 16] += x[j]^2 for j < len (len a multiple of 16 but at the end of a run):
  // two vectors of 8 doubles, so two chains of adds.
  template <typename X>
  static FO_INLINE void add_squares(const X* x, int64_t len, double* lanes) {
    int64_t j = 0;
    for (; j + kSumLanes <= len; j += kSumLanes) {
      for (int l = 0; l < kSumLanes; ++l) {
        const double v = static_cast<double>(cpu::load(x + j + l));
        lanes[l] += v * v;
      }
    }
    for (int l = 0; j < len; ++j, ++l) {
      const double v = static_cast<double>(cpu::load(x + j));
      lanes[l] += v * v;
    }
  }

  // lanes[j % 16] += x[j] (as add_squares).
  static FO_INLINE void add_terms(const M* x, int64_t len, double* lanes) {
    int64_t j = 0;
    for (; j + kSumLanes <= len; j += kSumLanes) {
      for (int l = 0; l < kSumLanes; ++l) lanes[l] += static_cast<double>(x[j + l]);
    }
    for (int l = 0; j < len; ++j, ++l) lanes[l] += static_cast<double>(x[j]);
  }

  // Note [Adafactor's update RMS]
  // The clipping needs the RMS of the update u = g / sqrt(max(estimate, eps1^2)) of the
  // whole param before any element is updated. Pass 2 sums u^2 as g^2 / max(estimate,
  // eps1^2), the estimate as row * (col * (1 / row_mean)): a square root and two divisions
  // fewer per element than pass 3's exact u, and within a few float ulps of its square
  // (the sum is already not torch's: Note [Adafactor's sums]). AdafactorRule::update_squared.

  // sums[0]: the update's sum of squares over the task, sums[1]: the param's. The squares
  // are computed kBuffer elements at a time into a buffer (a loop that vectorizes), then
  // added in lanes (Note [Adafactor's sums]).
  static FO_INLINE void pass2(const Entry& e, const Task& t, double* sums) {
    const Rule rule(e.c);
    double ul[kSumLanes] = {};
    double pl[kSumLanes] = {};
    alignas(64) M u2[kBuffer];
    if (e.factored) {
      const int64_t m = e.rows, n = e.cols;
      const T* g = static_cast<const T*>(e.g) + (t.slice * m + t.begin) * n;
      const T* p = static_cast<const T*>(e.p) + (t.slice * m + t.begin) * n;
      const M* row = adafactor::row_factors<T, M>(e) + t.slice * m;
      const M* col = adafactor::col_factors<T, M>(e) + t.slice * n;
      const M inv_row_mean = M(1) / static_cast<M>(e.row_means[t.slice]);
      const int64_t ahead = prefetch_distance(sizeof(T));
      for (int64_t r = t.begin; r < t.end; ++r, g += n, p += n) {
        const M rv = row[r] * inv_row_mean;
        for (int64_t j0 = 0; j0 < n; j0 += kBuffer) {
          const int64_t len = std::min(kBuffer, n - j0);
          if (ahead > 0) {
            prefetch_elements<0>(g + j0 + ahead, sizeof(T), 0, len);
            prefetch_elements<1>(p + j0 + ahead, sizeof(T), 0, len);  // pass 3 writes it
          }
#pragma GCC ivdep
          for (int64_t j = 0; j < len; ++j) {
            u2[j] = rule.update_squared(rv * col[j0 + j], cpu::load(g + j0 + j));
          }
          add_terms(u2, len, ul);
          add_squares(p + j0, len, pl);
        }
      }
    } else {
      // (g read first here: unscaled and stored back under a GradScaler. The new variance
      // is stored in pass 3: Note [Adafactor's passes].)
      const M inv = static_cast<M>(e.inv_grad_scale);
      T* g = static_cast<T*>(e.g);
      const T* var = static_cast<const T*>(e.var);
      const T* p = static_cast<const T*>(e.p);
      const int64_t ahead = prefetch_distance(sizeof(T));
      for (int64_t i0 = t.begin; i0 < t.end; i0 += kBuffer) {
        const int64_t len = std::min(kBuffer, t.end - i0);
        if (ahead > 0) {
          prefetch_elements<kUnscale ? 1 : 0>(g + i0 + ahead, sizeof(T), 0, len);
          prefetch_elements<0>(var + i0 + ahead, sizeof(T), 0, len);
          prefetch_elements<0>(p + i0 + ahead, sizeof(T), 0, len);
        }
#pragma GCC ivdep
        for (int64_t j = 0; j < len; ++j) {
          const M gv = grad_value<T, kUnscale>(g + i0 + j, inv);
          u2[j] = rule.update_squared(rule.variance(cpu::load(var + i0 + j), gv), gv);
        }
        add_terms(u2, len, ul);
        add_squares(p + i0, len, pl);
      }
    }
    double us = ul[0], ps = pl[0];
    for (int l = 1; l < kSumLanes; ++l) {
      us += ul[l];
      ps += pl[l];
    }
    sums[0] = us;
    sums[1] = ps;
  }

  // Elements [from, to) of a row of a factored param (factor rv): the update and the step.
  // kReciprocal: the estimate's division by div_by_reciprocal (Note [Adafactor's division
  // by the row mean]), where the row is in its domain.
  template <bool kDecay, bool kReciprocal>
  static FO_INLINE void pass3_row(const Rule& rule, M rv, const M* col, M row_mean,
                                  M inv_row_mean, const T* g, T* p, int64_t from, int64_t to) {
#pragma GCC ivdep
    for (int64_t j = from; j < to; ++j) {
      M estimate;
      if constexpr (kReciprocal) {
        estimate = div_by_reciprocal(rv * col[j], row_mean, inv_row_mean);
      } else {
        estimate = Rule::factored_estimate(rv, col[j], row_mean);
      }
      const M u = rule.update(estimate, cpu::load(g + j));
      store(rule.template apply<kDecay>(cpu::load(p + j), u), p + j);
    }
  }

  // kFma: the copy has FMA (Note [Adafactor's division by the row mean]).
  template <bool kDecay, bool kFma>
  static FO_INLINE void pass3(const Entry& e, const Task& t) {
    const Rule rule(e.c);
    if (e.factored) {
      const int64_t m = e.rows, n = e.cols;
      const T* g = static_cast<const T*>(e.g) + (t.slice * m + t.begin) * n;
      T* p = static_cast<T*>(e.p) + (t.slice * m + t.begin) * n;
      const M* row = adafactor::row_factors<T, M>(e) + t.slice * m;
      const M* col = adafactor::col_factors<T, M>(e) + t.slice * n;
      const M row_mean = static_cast<M>(e.row_means[t.slice]);
      constexpr bool kMayReciprocate = kFma && std::is_same_v<M, float>;
      SliceDomain domain{false, 0.0, 0.0, 0.0};
      M inv_row_mean = M(0);
      if constexpr (kMayReciprocate) {
        domain = slice_domain(col, n, row_mean);
        inv_row_mean = M(1) / row_mean;
      }
      const int64_t ahead = prefetch_distance(sizeof(T));
      for (int64_t r = t.begin; r < t.end; ++r, g += n, p += n) {
        const M rv = row[r];
        bool by_reciprocal = false;
        if constexpr (kMayReciprocate) {
          by_reciprocal = row_in_domain(rv, domain);
        }
        for (int64_t c = 0; c < n; c += kPrefetchChunk) {
          const int64_t chunk_end = std::min(n, c + kPrefetchChunk);
          if (ahead > 0) {
            prefetch_elements<0>(g + c + ahead, sizeof(T), 0, chunk_end - c);
            prefetch_elements<1>(p + c + ahead, sizeof(T), 0, chunk_end - c);
          }
          if (kMayReciprocate && by_reciprocal) {
            pass3_row<kDecay, kMayReciprocate>(rule, rv, col, row_mean, inv_row_mean, g, p, c,
                                               chunk_end);
          } else {
            pass3_row<kDecay, false>(rule, rv, col, row_mean, inv_row_mean, g, p, c, chunk_end);
          }
        }
      }
    } else {
      const T* g = static_cast<const T*>(e.g);
      T* var = static_cast<T*>(e.var);
      T* p = static_cast<T*>(e.p);
      const int64_t ahead = prefetch_distance(sizeof(T));
      for (int64_t c = t.begin; c < t.end; c += kPrefetchChunk) {
        const int64_t chunk_end = std::min(t.end, c + kPrefetchChunk);
        if (ahead > 0) {
          prefetch_elements<0>(g + c + ahead, sizeof(T), 0, chunk_end - c);
          prefetch_elements<1>(var + c + ahead, sizeof(T), 0, chunk_end - c);
          prefetch_elements<1>(p + c + ahead, sizeof(T), 0, chunk_end - c);
        }
#pragma GCC ivdep
        for (int64_t i = c; i < chunk_end; ++i) {
          const M gv = cpu::load(g + i);
          const M v = rule.variance(cpu::load(var + i), gv);
          store(v, var + i);
          const M u = rule.update(v, gv);  // var_estimate = variance.clone()
          store(rule.template apply<kDecay>(cpu::load(p + i), u), p + i);
        }
      }
    }
  }
};

// The passes of (T, unscale, decay), compiled for each ISA (Note [ISA dispatch] in
// multi_tensor.h): every operation is exactly rounded, so every copy gives the same bits.
struct PassFns {
  void (*pass1)(const Entry&, const Task&, double*, double*);
  void (*finish)(const Entry&, int64_t, const double*, double*);
  void (*pass2)(const Entry&, const Task&, double*);
  void (*pass3)(const Entry&, const Task&);
};

#define FO_ADAFACTOR_COPY(suffix, attr, fma)                                               \
  template <typename T, bool kU>                                                          \
  attr void pass1_##suffix(const Entry& e, const Task& t, double* parts, double* means) { \
    Passes<T, kU>::pass1(e, t, parts, means);                                             \
  }                                                                                       \
  template <typename T, bool kU>                                                          \
  attr void finish_##suffix(const Entry& e, int64_t s, const double* sums, double* means) { \
    Passes<T, kU>::finish_slice(e, s, sums, means);                                       \
  }                                                                                       \
  template <typename T, bool kU>                                                          \
  attr void pass2_##suffix(const Entry& e, const Task& t, double* sums) {                 \
    Passes<T, kU>::pass2(e, t, sums);                                                     \
  }                                                                                       \
  template <typename T, bool kU, bool kDecay>                                             \
  attr void pass3_##suffix(const Entry& e, const Task& t) {                               \
    Passes<T, kU>::template pass3<kDecay, fma>(e, t);                                     \
  }                                                                                       \
  template <typename T, bool kU, bool kDecay>                                             \
  PassFns fns_##suffix() {                                                                \
    return PassFns{&pass1_##suffix<T, kU>, &finish_##suffix<T, kU>, &pass2_##suffix<T, kU>, \
                   &pass3_##suffix<T, kU, kDecay>};                                       \
  }

FO_ADAFACTOR_COPY(baseline, , false)
#if FO_X86_CLONES
FO_ADAFACTOR_COPY(avx2, FO_AVX2_TARGET, true)
FO_ADAFACTOR_COPY(avx512, FO_AVX512_TARGET, true)
#endif
#undef FO_ADAFACTOR_COPY

template <typename T, bool kU, bool kDecay>
PassFns pick_fns() {
#if FO_X86_CLONES
  switch (cpu_isa()) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: return fns_avx512<T, kU, kDecay>();
    case Isa::kAvx2: return fns_avx2<T, kU, kDecay>();
    case Isa::kBaseline: break;
  }
#endif
  return fns_baseline<T, kU, kDecay>();
}

PassFns select_fns(at::ScalarType dtype, bool unscale, bool decay) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    if (unscale) return decay ? pick_fns<T, true, true>() : pick_fns<T, true, false>();
    return decay ? pick_fns<T, false, true>() : pick_fns<T, false, false>();
  });
}

// Runs fn(k) for every task k in [first, last) in one parallel region, the tasks split
// into one run of consecutive tasks per thread of about equal cost (rows * cols elements
// plus a fixed cost per task): tasks differ in size (a 256K-element block of pass 1, a
// short vector), and an even split by count would leave threads waiting at the end of
// each pass. Which thread runs a task changes no result: each task's sums are its own
// (Note [Adafactor's sums]).
template <typename Fn>
void run_tasks(const std::vector<Task>& all_tasks, int64_t first, int64_t last,
               const std::vector<Entry>& entries, Fn&& fn) {
  constexpr int64_t kTaskCost = 256;  // elements' worth of work per task (its setup)
  const Task* tasks = all_tasks.data() + first;
  const int64_t n = last - first;
  if (n <= 0) return;
  int64_t parts = at::in_parallel_region() ? 1 : std::min<int64_t>(n, at::get_num_threads());
  std::vector<int64_t> prefix(static_cast<size_t>(n + 1), 0);
  for (int64_t k = 0; parts > 1 && k < n; ++k) {
    const Task& t = tasks[k];
    const Entry& e = entries[t.entry];
    const int64_t elements = e.factored ? (t.end - t.begin) * e.cols : t.end - t.begin;
    prefix[k + 1] = prefix[k] + elements + kTaskCost;
  }
  if (prefix[n] < kGrainSize) parts = 1;  // as the elementwise loops: no threads for little work
  if (parts <= 1) {
    for (int64_t k = 0; k < n; ++k) fn(first + k);
    return;
  }
  std::vector<int64_t> bounds(static_cast<size_t>(parts + 1), n);
  bounds[0] = 0;
  for (int64_t part = 1, k = 0; part < parts; ++part) {
    const int64_t target = prefix[n] / parts * part;
    while (k < n && prefix[k + 1] <= target) ++k;
    bounds[part] = std::max(k, bounds[part - 1]);
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t k = bounds[part]; k < bounds[part + 1]; ++k) fn(first + k);
    }
  });
}

// Note [Adafactor's waves]
// The three passes run over a wave of consecutive params before the next wave: up to
// kWaveElements elements (a larger param is a wave alone), so that the grads pass 1 read
// and the params and grads pass 2 read (8 MB for float32) are still in the last-level
// cache when passes 2 and 3 read them again. What a wave changes is only which tasks run
// in each parallel region: every task and every sum is the same (Note [Adafactor's
// sums]), so the bits are those of any other wave size. A wave of one param needs tasks
// for both threads in pass 1 too, hence pass 1's row blocks of 2^18 elements (2^22
// before). Measured on a 2-core AMD EPYC, Zen 5 (2026-12-04, W2 = GPT-2 small in fp32,
// interleaved in one process): one wave for the whole group 53.6-54.9 ms a step (median),
// waves of 2^20 elements 48.2-49.0 ms (1.09-1.15x), of 2^19 or 2^21 about the same, and
// row blocks of 2^18 without waves 1.02-1.03x; at 1 thread 1.08x. The embedding (a third
// of W2's elements, 150 MB of grads) is a wave alone, and gains nothing. 16-bit params
// are bound by their arithmetic, not by memory (W4, bf16: 59% of the limit), and there
// waves cost 2-10% (their parallel regions: four a wave): consecutive 16-bit params are
// one wave.
// FUSED_OPTIM_ADAFACTOR_WAVE=auto|off|N forces it (N elements; off: one wave), for
// experiments: the tests run with several forced and compare every bit.
constexpr int64_t kWaveElements = int64_t{1} << 20;

int64_t adafactor_wave_elements() {
  static const int64_t wave =
      env_count("FUSED_OPTIM_ADAFACTOR_WAVE", std::numeric_limits<int64_t>::max(),
                "a number of elements (a positive integer)")
          .value_or(kWaveElements);
  return wave;
}

void adafactor_cpu(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                   at::TensorList col_vars, at::TensorList variances,
                   at::TensorList state_steps, double lr, double beta2_decay,
                   std::optional<double> eps1, double eps2, double d, double weight_decay,
                   bool maximize, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const int64_t wave = adafactor_wave_elements();  // (a bad variable: an error before any change)
  // Every check, the steps, the entries and the tasks (adafactor_plan.h).
  adafactor::Plan plan;
  if (!adafactor::make_plan(plan, c10::Device(c10::kCPU), params, grads, row_vars, col_vars,
                            variances, state_steps, lr, beta2_decay, eps1, eps2, d,
                            weight_decay, maximize, lr_tensor, grad_scale, found_inf)) {
    return;
  }
  std::vector<Entry>& entries = plan.entries;
  const int64_t n = static_cast<int64_t>(entries.size());
  std::vector<double> row_means(static_cast<size_t>(plan.num_slices));
  std::vector<float> factors(static_cast<size_t>(plan.num_factors));
  plan.set_buffers(row_means.data(), factors.data());
  std::vector<PassFns> fns(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const bool same = i > 0 && params[i].scalar_type() == params[i - 1].scalar_type();
    fns[i] = same ? fns[i - 1] : select_fns(params[i].scalar_type(), plan.unscale, plan.decay);
  }

  // The passes run wave by wave (Note [Adafactor's waves]); the tasks, the slices of
  // several blocks and the entries are all in entry order.
  const std::vector<Task>& tasks1 = plan.tasks1;
  const std::vector<Task>& tasks2 = plan.tasks2;
  const auto& multi = plan.multi;
  std::vector<double> partials(static_cast<size_t>(plan.partials_size));
  std::vector<double> sums(static_cast<size_t>(2 * tasks2.size()));
  int64_t k1 = 0, km = 0;  // the next pass-1 task and multi-block slice
  const auto half = [&](int64_t i) {
    return entries[i].dtype == adafactor::kBF16 || entries[i].dtype == adafactor::kF16;
  };
  for (int64_t e0 = 0; e0 < n;) {
    int64_t e1 = e0 + 1, elements = entries[e0].numel;
    if (wave <= 0) {
      e1 = n;
    } else if (half(e0)) {  // 16-bit params: one wave of all in a row (Note [Adafactor's waves])
      while (e1 < n && half(e1)) ++e1;
    } else {
      while (e1 < n && !half(e1) && elements + entries[e1].numel <= wave) {
        elements += entries[e1++].numel;
      }
    }
    int64_t k1_end = k1, km_end = km;
    while (k1_end < static_cast<int64_t>(tasks1.size()) && tasks1[k1_end].entry < e1) ++k1_end;
    while (km_end < static_cast<int64_t>(multi.size()) && multi[km_end].entry < e1) ++km_end;
    const int64_t k2 = entries[e0].tasks2_begin, k2_end = entries[e1 - 1].tasks2_end;

    // -- pass 1 (Note [Adafactor's passes]) ---------------------------------------------
    run_tasks(tasks1, k1, k1_end, entries, [&](int64_t k) {
      const Task& t = tasks1[k];
      const Entry& e = entries[t.entry];
      fns[t.entry].pass1(e, t, partials.data(), e.row_means);
    });
    if (km_end > km) {
      at::parallel_for(km, km_end, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const adafactor::MultiBlockSlice& s = multi[k];
          const Entry& e = entries[s.entry];
          double* sums1 = partials.data() + s.partial;
          for (int64_t b = 1; b < s.blocks; ++b) {
            const double* block = sums1 + b * e.cols;
            for (int64_t j = 0; j < e.cols; ++j) sums1[j] += block[j];
          }
          fns[s.entry].finish(e, s.slice, sums1, e.row_means);
        }
      });
    }

    // -- pass 2 -------------------------------------------------------------------------
    run_tasks(tasks2, k2, k2_end, entries, [&](int64_t k) {
      const Task& t = tasks2[k];
      fns[t.entry].pass2(entries[t.entry], t, sums.data() + 2 * k);
    });

    // alpha and denom of each param, from its tasks' sums in task order.
    for (int64_t i = e0; i < e1; ++i) {
      Entry& e = entries[i];
      double usum = 0.0, psum = 0.0;
      for (int64_t k = e.tasks2_begin; k < e.tasks2_end; ++k) {
        usum += sums[2 * k];
        psum += sums[2 * k + 1];
      }
      e.c.step_scale = adafactor::step_scale(e, plan.finish, usum, psum);
    }

    // -- pass 3 -------------------------------------------------------------------------
    run_tasks(tasks2, k2, k2_end, entries, [&](int64_t k) {
      const Task& t = tasks2[k];
      fns[t.entry].pass3(entries[t.entry], t);
    });
    e0 = e1;
    k1 = k1_end;
    km = km_end;
  }
  plan.layouts.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adafactor_", &adafactor_cpu); }

}  // namespace fused_optim::cpu
