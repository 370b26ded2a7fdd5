// Gradient clipping by global norm on the CPU: the per-tensor norms of a list of tensors in
// one parallel region (fused_optim::_norms), and the in-place multiply of a list by one
// scalar (fused_optim::_mul_). They are the second kind of kernel of the library: a
// reduction, not an elementwise update, so they do not go through MultiTensorPlan.
// fused_optim/clip.py turns them into torch.nn.utils.clip_grad_norm_.
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // (at::internal::GRAIN_SIZE)

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/grad_norm.h"
#include "cpu/multi_tensor.h"

namespace fused_optim::cpu {
namespace {

// Note [global norm]
// clip_grad_norm_ takes torch.linalg.vector_norm of each grad, then the norm of those
// norms. On an x86 CPU torch's 2-norm of a dense float, double or bfloat16 tensor is one
// pass in memory order (its AVX2 kernel) with one accumulator of 32 bytes: 8 float lanes
// (bfloat16 values widened to float, 16 per step: the first 8, then the next 8) or 4
// double lanes, each lane a chain of `acc + x * x` without fma; then the lanes are added
// in order, then the leftover elements one by one, each with an fma (the compiler
// contracted that scalar loop; for float it also vectorized the loop's products four at a
// time: a group of four leftover elements is four rounded products added in order, and
// only the last 1-3 are fmas), and the square root of that, rounded to the tensor's
// dtype. That pass runs on one thread, one tensor after another. A float16 tensor takes
// torch's generic reduction instead: one chain of `acc + x * x` in float, split into one
// contiguous run per thread when it has 32,768 elements or more (at::parallel_for's
// split), the runs' sums then added in thread order. The functions below add in those
// same orders, so each norm is bitwise torch's (tests/test_clip.py, also in the smoke
// suite: float32 and float64 measured the same on torch 2.8, 2.13 and 2.14); what runs
// in parallel here is tensors (and runs), spread over the threads by size. The infinity norm (the
// largest |x|, NaN if any is NaN) does not depend on the order. torch's norm of a tensor
// of one element is that element's |x| (no square to over- or underflow), and for the
// 0-"norm" whether it is not 0: so here too.
// Every other norm type takes torch's generic reduction (binary_kernel_reduce), for every
// dtype, with its float accumulator for 16-bit tensors (the order above: one chain per
// contiguous run, runs added in thread order), each element's term and the projection of
// the sum as torch's ops write them (SharedReduceOps.h): for p = 1, acc + |x|; for p = 0,
// acc + (x != 0), the count; for p = -inf, the smallest |x| (NaN if any is NaN); for any
// other p (fractional, negative, NaN), acc + pow(|x|, p) with p rounded to the
// accumulator's type, then pow(sum, 1 / p), both pow being the C library's pow/powf, as
// torch calls it. So those norms are bitwise torch's too (tests/test_clip.py: p in 0, 1,
// 0.5, 1.5, 3, -1, -2, -inf, NaN, on every dtype, 1 and 2 threads). Those chains are
// computed eight at a time (Note [interleaved chains]), the largest and smallest |x| in
// eight lanes; the threads share out whole norms and chains (a split tensor's runs go to
// different threads, as torch's do), and each tensor's runs are added on the caller.
// An empty tensor, and one that is not dense, gets torch's own norm, on the calling thread
// (an empty tensor's norm is 0, or torch's error where the norm type has no identity); the
// norm of the norms is always computed by torch (clip.py).
// `inv_scale` != 1: the norm of the tensors multiplied by it and rounded to their dtype,
// as a GradScaler's unscale_ leaves grads before clip_grad_norm_ reads them.

template <typename T>
FO_INLINE at::opmath_type<T> unscaled(const T* p, at::opmath_type<T> inv_scale, bool unscale) {
  using M = at::opmath_type<T>;
  M v = cpu::load(p);
  if (unscale) {
    T rounded;
    store(v * inv_scale, &rounded);
    v = cpu::load(&rounded);
  }
  return v;
}

template <typename T, bool kUnscale>
at::opmath_type<T> sum_squares(const T* x, int64_t n, at::opmath_type<T> inv_scale) {
  using M = at::opmath_type<T>;
  constexpr int kLanes = 32 / sizeof(M);                  // 8 floats or 4 doubles
  constexpr int kStep = std::is_same_v<T, M> ? kLanes : 2 * kLanes;  // 16-bit: 16 per step
  M acc[kLanes] = {};
  const int64_t body = n - n % kStep;
  for (int64_t d = 0; d < body; d += kStep) {
    for (int half = 0; half < kStep / kLanes; ++half) {
      M v[kLanes];
      for (int j = 0; j < kLanes; ++j) v[j] = unscaled(x + d + half * kLanes + j, inv_scale, kUnscale);
      for (int j = 0; j < kLanes; ++j) acc[j] = acc[j] + v[j] * v[j];
    }
  }
  M sum = acc[0];
  for (int j = 1; j < kLanes; ++j) sum = sum + acc[j];
  int64_t d = body;
  if constexpr (std::is_same_v<T, float>) {
    // float: the compiler vectorized the products of torch's leftover loop four at a
    // time, each rounded, added in order; the last 1-3 elements are fmas.
    for (; d + 4 <= n; d += 4) {
      M v[4];
      for (int j = 0; j < 4; ++j) v[j] = unscaled(x + d + j, inv_scale, kUnscale);
      for (int j = 0; j < 4; ++j) sum = sum + v[j] * v[j];
    }
  }
  for (; d < n; ++d) {
    const M v = unscaled(x + d, inv_scale, kUnscale);
    sum = std::fma(v, v, sum);
  }
  return sum;
}

// The norm types, each with its own reduction (Note [global norm]).
enum class Ord { kTwo, kInf, kOne, kZero, kNegInf, kP };

Ord ord_kind(double ord) {
  if (ord == 2.0) return Ord::kTwo;
  if (ord == 1.0) return Ord::kOne;
  if (ord == 0.0) return Ord::kZero;
  if (std::isinf(ord)) return ord > 0 ? Ord::kInf : Ord::kNegInf;
  return Ord::kP;  // (NaN too: torch's NormOps then)
}

// The largest (kMax) or smallest |x| of x[0, n), NaN if any is NaN: in any order, so in
// eight independent lanes, each a compare and select (maxps/minps, NaN kept apart), which
// the compiler vectorizes.
template <typename T, bool kUnscale, bool kMax>
at::opmath_type<T> abs_extreme(const T* x, int64_t n, at::opmath_type<T> inv_scale) {
  using M = at::opmath_type<T>;
  constexpr int kLanes = 8;
  const M init = kMax ? M(0) : std::numeric_limits<M>::infinity();
  M m[kLanes];
  int nan[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    m[j] = init;
    nan[j] = 0;
  }
  const int64_t body = n - n % kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) {
      const M v = std::abs(unscaled(x + d + j, inv_scale, kUnscale));
      nan[j] |= v != v;
      m[j] = kMax ? (v > m[j] ? v : m[j]) : (v < m[j] ? v : m[j]);
    }
  }
  for (int64_t d = body; d < n; ++d) {
    const M v = std::abs(unscaled(x + d, inv_scale, kUnscale));
    nan[0] |= v != v;
    m[0] = kMax ? (v > m[0] ? v : m[0]) : (v < m[0] ? v : m[0]);
  }
  M r = m[0];
  int any_nan = nan[0];
  for (int j = 1; j < kLanes; ++j) {
    r = kMax ? (m[j] > r ? m[j] : r) : (m[j] < r ? m[j] : r);
    any_nan |= nan[j];
  }
  return any_nan ? std::numeric_limits<M>::quiet_NaN() : r;
}

// The norm of one dense tensor (Note [global norm]), in its dtype, where it takes no chain
// of torch's generic reduction: one element, the 2-norm of float, double and bfloat16
// (torch's vector loop), and the inf and -inf norms.
template <typename T>
T direct_norm(const T* x, int64_t n, Ord kind, double inv_scale) {
  using M = at::opmath_type<T>;
  const M inv = static_cast<M>(inv_scale);
  const bool unscale = inv_scale != 1.0;
  M r;
  if (n == 1) {
    // torch's norm of one element is its |x|, for every ord but 0: whether it is not 0.
    const M v = unscale ? unscaled(x, inv, true) : cpu::load(x);
    r = kind == Ord::kZero ? (v != M(0) ? M(1) : M(0)) : std::abs(v);
  } else if (kind == Ord::kTwo) {
    r = std::sqrt(unscale ? sum_squares<T, true>(x, n, inv) : sum_squares<T, false>(x, n, inv));
  } else {
    if (kind == Ord::kInf) {
      r = unscale ? abs_extreme<T, true, true>(x, n, inv) : abs_extreme<T, false, true>(x, n, inv);
    } else {
      r = unscale ? abs_extreme<T, true, false>(x, n, inv) : abs_extreme<T, false, false>(x, n, inv);
    }
    if (r != r) r = std::numeric_limits<M>::quiet_NaN();  // (torch's: not the element's bits)
  }
  T out;
  store(r, &out);
  return out;
}

// Whether the norm of n elements of T takes torch's generic reduction (binary_kernel_reduce).
template <typename T>
bool chained(Ord kind, int64_t n) {
  if (n < 2 || kind == Ord::kInf || kind == Ord::kNegInf) return false;
  return kind != Ord::kTwo || std::is_same_v<T, c10::Half>;
}

// torch's generic reduction (binary_kernel_reduce) splits a tensor of at::internal::
// GRAIN_SIZE elements or more into one contiguous run per thread (at::parallel_for's split)
// where `threads` (the caller's at::get_num_threads(), 1 in a parallel region) is more
// than 1; each run is a chain `acc = acc + term(x)` from 0 in memory order; the runs'
// sums are added in thread order, the threads left without a run adding 0.
constexpr int64_t kTorchGrain = at::internal::GRAIN_SIZE;  // (torch's own: a release changing it keeps us in step)

int64_t torch_runs(int64_t n, int64_t threads) {
  if (n < kTorchGrain || threads <= 1) return 1;
#if defined(_OPENMP)
  // (at::parallel_for splits among the threads OpenMP starts, which OMP_THREAD_LIMIT caps;
  // with OMP_DYNAMIC=true OpenMP may start fewer, run by run: torch's own norms then vary)
  threads = std::min<int64_t>(threads, omp_get_thread_limit());
#endif
  return std::min(threads, (n + kTorchGrain - 1) / kTorchGrain);
}

// Note [the norms' MXCSR]
// torch.set_flush_denormal(True) sets MXCSR's flush-to-zero and denormals-are-zero bits of
// the calling thread only. torch computes a norm on the calling thread, except the runs
// after the first of a split one, which its pool's other threads compute, each under its
// own MXCSR (the first run is the calling thread's: OpenMP's thread 0). So our threads take
// the caller's MXCSR for whole tensors and first runs, and run j of a split tensor that
// of the pool's thread j (read before, where a tensor is split): with subnormal elements
// the sums are torch's either way. (Found by a review, 2026-12-07: the 0-norm of
// subnormals counted them where torch's flushed count did not.)
class CsrScope {  // sets a thread's MXCSR, and puts its own back at the end of the scope
 public:
#if defined(__x86_64__) || defined(__i386__)
  explicit CsrScope(unsigned csr) : own_(_mm_getcsr()) { _mm_setcsr(csr); }
  ~CsrScope() { _mm_setcsr(own_); }
  static void set(unsigned csr) { _mm_setcsr(csr); }
  static unsigned current() { return _mm_getcsr(); }

 private:
  unsigned own_;
#else
  explicit CsrScope(unsigned) {}
  static void set(unsigned) {}
  static unsigned current() { return 0; }
#endif
};

// One run of a chain: n elements from x, its sum to partial[slot].
template <typename T>
struct Chain {
  const T* x;
  int64_t n;
  int64_t slot;
  int64_t run;  // which of its tensor's runs: torch's thread (Note [the norms' MXCSR])
  at::opmath_type<T> acc;  // its sum so far (0 where it starts)
};

// c10's float16 -> float conversion without F16C (torch/headeronly/util/Half.h's
// fp16_ieee_to_fp32_value), the same arithmetic, its one choice (a subnormal input or not)
// a select on bits: as c10 writes it, GCC makes it a branch, and a loop of it stays scalar.
FO_INLINE float widen_half_bits(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = __builtin_bit_cast(float, (two_w >> 4) + (0xE0u << 23)) *
                           __builtin_bit_cast(float, 15u << 23);  // 2^-112
  const float denormalized = __builtin_bit_cast(float, (two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t subnormal = two_w < (1u << 27) ? 0xFFFFFFFFu : 0u;
  return __builtin_bit_cast(float, sign | (__builtin_bit_cast(uint32_t, denormalized) & subnormal) |
                                       (__builtin_bit_cast(uint32_t, normalized) & ~subnormal));
}

// Note [interleaved chains]
// Each chain is a sequence of dependent adds (torch's order), one add's latency per
// element: a single chain runs at a fraction of what the core can add. Chains of different
// runs and tensors are independent, so kLanes of them advance in lockstep, each in its own
// accumulator: the sums are each chain's own, bit for bit, kLanes times as fast. A chain
// that ends hands its lane to the next one; when fewer than kLanes are left, the rest go
// on in half as many lanes (a tensor's long runs outlast the short tensors around them:
// one at a time, GPT-2's embedding took most of a 1-norm's time).
template <int kLanes, typename T, bool kUnscale, typename Term>
void fold_chains(const std::vector<Chain<T>>& chains, at::opmath_type<T>* partial,
                 at::opmath_type<T> inv_scale, Term term) {
  using M = at::opmath_type<T>;
  if constexpr (kLanes == 1) {
    for (const Chain<T>& c : chains) {
      M a = c.acc;
      for (int64_t i = 0; i < c.n; ++i) a = a + term(unscaled(c.x + i, inv_scale, kUnscale));
      partial[c.slot] = a;
    }
  } else {
    Chain<T> lane[kLanes];
    int live = 0;
    size_t next = 0;
    while (true) {
      for (; live < kLanes && next < chains.size(); ++live, ++next) lane[live] = chains[next];
      if (live < kLanes) break;
      int64_t step = lane[0].n;
      for (int k = 1; k < kLanes; ++k) step = std::min(step, lane[k].n);
      {
        // (local copies indexed by constants only, so that they live in registers)
        const T* xs[kLanes];
        M a[kLanes];
#pragma GCC unroll 16
        for (int k = 0; k < kLanes; ++k) {
          xs[k] = lane[k].x;
          a[k] = lane[k].acc;
        }
        if constexpr (std::is_same_v<T, M>) {
          for (int64_t i = 0; i < step; ++i) {
#pragma GCC unroll 16
            for (int k = 0; k < kLanes; ++k) a[k] = a[k] + term(unscaled(xs[k] + i, inv_scale, kUnscale));
          }
        } else {
          // 16-bit elements: widened a block at a time, in loops the compiler vectorizes
          // (element by element, among the lanes' adds, float16's widening stayed scalar
          // code and took most of the time)
          constexpr int64_t kBlock16 = 64;
          alignas(64) M buf[kLanes][kBlock16];
          for (int64_t i0 = 0; i0 < step; i0 += kBlock16) {
            const int64_t m = std::min(kBlock16, step - i0);
            for (int k = 0; k < kLanes; ++k) {
              if constexpr (std::is_same_v<T, c10::Half> && !kUnscale) {
                const uint16_t* h = reinterpret_cast<const uint16_t*>(xs[k] + i0);
                for (int64_t b = 0; b < m; ++b) buf[k][b] = widen_half_bits(h[b]);
              } else {
                for (int64_t b = 0; b < m; ++b) buf[k][b] = unscaled(xs[k] + i0 + b, inv_scale, kUnscale);
              }
            }
            for (int64_t b = 0; b < m; ++b) {
#pragma GCC unroll 16
              for (int k = 0; k < kLanes; ++k) a[k] = a[k] + term(buf[k][b]);
            }
          }
        }
#pragma GCC unroll 16
        for (int k = 0; k < kLanes; ++k) lane[k].acc = a[k];
      }
      int kept = 0;
      for (int k = 0; k < kLanes; ++k) {
        if (lane[k].n == step) {
          partial[lane[k].slot] = lane[k].acc;
          continue;
        }
        lane[kept] = lane[k];
        lane[kept].x += step;
        lane[kept].n -= step;
        ++kept;
      }
      live = kept;
    }
    const std::vector<Chain<T>> rest(lane, lane + live);
    fold_chains<kLanes / 2, T, kUnscale>(rest, partial, inv_scale, term);
  }
}

// The chains' sums for `kind`, each element's term as torch's ops write it (Note [global
// norm]). pow is a call into the C library, after which no accumulator stays in a
// register: its chains go one at a time.
template <typename T, bool kUnscale>
void fold_kind(const std::vector<Chain<T>>& chains, at::opmath_type<T>* partial, Ord kind,
               at::opmath_type<T> p, at::opmath_type<T> inv_scale) {
  using M = at::opmath_type<T>;
  constexpr int kLanes = 8;
  switch (kind) {
    case Ord::kTwo:
      return fold_chains<kLanes, T, kUnscale>(chains, partial, inv_scale, [](M v) { return v * v; });
    case Ord::kOne:
      return fold_chains<kLanes, T, kUnscale>(chains, partial, inv_scale, [](M v) { return std::abs(v); });
    case Ord::kZero:
      return fold_chains<kLanes, T, kUnscale>(chains, partial, inv_scale,
                                              [](M v) { return v == M(0) ? M(0) : M(1); });
    case Ord::kP:
      return fold_chains<1, T, kUnscale>(chains, partial, inv_scale,
                                         [p](M v) { return std::pow(std::abs(v), p); });
    default:
      return;  // (not chained)
  }
}

// Splits tensors [0, n) into `parts` runs of consecutive tensors of about equal cost
// (elements, plus a fixed cost per tensor): bounds[k] to bounds[k + 1] is run k.
std::vector<int64_t> balanced_runs(const std::vector<int64_t>& cost, int64_t parts) {
  const int64_t n = static_cast<int64_t>(cost.size());
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  std::vector<int64_t> bounds(parts + 1, n);
  bounds[0] = 0;
  int64_t i = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = prefix[n] * k / parts;
    while (i < n && prefix[i + 1] <= target) ++i;
    bounds[k] = std::max(i, bounds[k - 1]);
  }
  return bounds;
}

constexpr int64_t kTensorCost = 256;  // elements' worth of work per tensor (its setup)

}  // namespace

at::Tensor norms_cpu(at::TensorList tensors, double ord, double inv_scale) {
  constexpr const char* op = "fused_optim::_norms";
  const Ord kind = ord_kind(ord);
  TORCH_CHECK(!tensors.empty(), op, ": expects at least one tensor");
  const at::ScalarType dtype = tensors[0].scalar_type();
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, op,
                ": expects dense CPU tensors, got one on ", t.device(), " with layout ",
                t.layout());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": expects tensors of one dtype, got ", dtype,
                " and ", t.scalar_type());
  }
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::empty({n}, tensors[0].options());
  std::vector<int64_t> cost(n);
  std::vector<char> ours(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    ours[i] = t.numel() > 0 && t.is_non_overlapping_and_dense() && !t.is_neg() && !t.is_conj();
    cost[i] = ours[i] ? t.numel() + kTensorCost : 0;
  }
  dispatch_dtype(dtype, [&]<typename T>() -> SegmentFn {
    T* result = out.mutable_data_ptr<T>();
    // torch's own norm for the rest, here, before the parallel region.
    for (int64_t i = 0; i < n; ++i) {
      if (ours[i]) continue;
      at::Tensor t = tensors[i];
      if (inv_scale != 1.0) {
        // As unscale_ leaves it, rounded to T, and with its strides: the norm of a strided
        // tensor sums in another order than that of a contiguous one (t.mul() of a
        // non-dense t is contiguous: the norm was not torch's, found by a review,
        // 2026-12-06). An expanded t (a stride 0), which unscale_ refuses, stays as mul
        // makes it.
        // (ATen's check: a stride 0 over a dimension of more than one element)
        const bool expanded = at::has_internal_overlap(t) == at::MemOverlap::Yes;
        at::Tensor u = t.mul(inv_scale);
        if (!expanded && !t.is_non_overlapping_and_dense()) {
          t = at::empty_strided(t.sizes(), t.strides(), t.options()).copy_(u);
        } else {
          t = u;
        }
      }
      // torch.nn.utils' clipping calls _foreach_norm on the CPU: its value, or its error
      // (its message changed between releases: torch 2.8's CPU _foreach_norm raised
      // linalg.vector_norm's) for an empty tensor and a norm type with no identity.
      result[i] = t.numel() == 0 ? at::_foreach_norm({t}, ord)[0].item<T>()
                                 : at::linalg_vector_norm(t, ord).item<T>();
    }
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    using M = at::opmath_type<T>;
    const M p = static_cast<M>(ord);  // (torch's NormOps keeps p in the accumulator type)
    const M inv = static_cast<M>(inv_scale);
    // The work: tensors whose norm takes no chain, and chains, one per run of torch's
    // split (Note [interleaved chains]), in `chains` with their slot in `partial`. Items
    // are spread over the threads by cost: tensors and first runs in list order, then
    // the second runs, ..., so that a big tensor's runs go to different threads, as
    // torch's do.
    struct Item {
      int64_t tensor;  // a tensor's whole norm, or -1
      int64_t chain;   // a chain (index in `chains`), or -1
    };
    std::vector<Chain<T>> chains;
    std::vector<int64_t> first_chain(n, -1);
    std::vector<int64_t> runs_of(n, 0);
    std::vector<Item> items;
    std::vector<int64_t> item_cost;
    int64_t most_runs = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!ours[i]) continue;
      const T* x = static_cast<const T*>(tensors[i].const_data_ptr());
      const int64_t numel = tensors[i].numel();
      if (!chained<T>(kind, numel)) {
        items.push_back({i, -1});
        item_cost.push_back(cost[i]);
        continue;
      }
      const int64_t runs = torch_runs(numel, threads);
      const int64_t run = (numel + runs - 1) / runs;
      first_chain[i] = static_cast<int64_t>(chains.size());
      runs_of[i] = runs;
      most_runs = std::max(most_runs, runs);
      for (int64_t b = 0, j = 0; b < numel; b += run, ++j) {
        const int64_t slot = static_cast<int64_t>(chains.size());
        chains.push_back({x + b, std::min(run, numel - b), slot, j, M(0)});
      }
      items.push_back({-1, first_chain[i]});
      item_cost.push_back(chains[first_chain[i]].n + kTensorCost);
    }
    for (int64_t j = 1; j < most_runs; ++j) {
      for (int64_t i = 0; i < n; ++i) {
        if (runs_of[i] > j) {
          items.push_back({-1, first_chain[i] + j});
          item_cost.push_back(chains[first_chain[i] + j].n);
        }
      }
    }
    // Each thread's MXCSR, where a tensor is split (Note [the norms' MXCSR]; the largest
    // and smallest |x| are split as the sums are, though their value does not depend on
    // the order: the MXCSR of each run's thread does).
    const bool extreme = kind == Ord::kInf || kind == Ord::kNegInf;
    for (int64_t i = 0; i < n && extreme; ++i) {
      if (ours[i]) most_runs = std::max(most_runs, torch_runs(tensors[i].numel(), threads));
    }
    const unsigned caller_csr = CsrScope::current();
    std::vector<unsigned> run_csr(std::max<int64_t>(threads, 1), caller_csr);
    if (most_runs > 1) {
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        run_csr[at::get_thread_num()] = CsrScope::current();
      });
    }
    bool one_csr = true;
    for (int64_t j = 1; j < most_runs; ++j) one_csr = one_csr && run_csr[j] == caller_csr;
    std::vector<M> partial(chains.size());
    const std::vector<int64_t> bounds = balanced_runs(item_cost, threads);
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      const CsrScope csr(caller_csr);
      for (int64_t k = begin; k < end; ++k) {
        std::vector<Chain<T>> mine;
        for (int64_t it = bounds[k]; it < bounds[k + 1]; ++it) {
          const Item& item = items[it];
          if (item.chain >= 0) {
            mine.push_back(chains[item.chain]);
          } else {
            const at::Tensor& t = tensors[item.tensor];
            const T* x = static_cast<const T*>(t.const_data_ptr());
            const int64_t numel = t.numel();
            const int64_t runs = extreme && !one_csr ? torch_runs(numel, threads) : 1;
            if (runs == 1) {
              result[item.tensor] = direct_norm<T>(x, numel, kind, inv_scale);
              continue;
            }
            // run j under the MXCSR of torch's thread j, then as torch combines them
            const int64_t run = (numel + runs - 1) / runs;
            M r = kind == Ord::kInf ? M(0) : std::numeric_limits<M>::infinity();
            bool nan = false;
            for (int64_t b = 0, j = 0; b < numel; b += run, ++j) {
              CsrScope::set(run_csr[j]);
              const T run_norm = direct_norm<T>(x + b, std::min(run, numel - b), kind, inv_scale);
              const M v = cpu::load(&run_norm);
              CsrScope::set(caller_csr);
              nan = nan || v != v;
              r = kind == Ord::kInf ? (v > r ? v : r) : (v < r ? v : r);
            }
            store(nan ? std::numeric_limits<M>::quiet_NaN() : r, &result[item.tensor]);
          }
        }
        auto fold = [&](const std::vector<Chain<T>>& some) {
          if (inv_scale != 1.0) {
            fold_kind<T, true>(some, partial.data(), kind, p, inv);
          } else {
            fold_kind<T, false>(some, partial.data(), kind, p, inv);
          }
        };
        if (one_csr) {
          fold(mine);
          continue;
        }
        for (int64_t j = 0; j < most_runs; ++j) {  // run j under the MXCSR of torch's thread j
          std::vector<Chain<T>> runs_j;
          for (const Chain<T>& chain : mine) {
            if (chain.run == j) runs_j.push_back(chain);
          }
          if (runs_j.empty()) continue;
          CsrScope::set(run_csr[j]);
          fold(runs_j);
          CsrScope::set(caller_csr);
        }
      }
    });
    // Each tensor's runs added in thread order, then projected.
    for (int64_t i = 0; i < n; ++i) {
      if (first_chain[i] < 0) continue;
      const M* sums = partial.data() + first_chain[i];
      M total = sums[0];
      if (runs_of[i] > 1) {
        total = M(0) + total;
        for (int64_t j = 1; j < runs_of[i]; ++j) total = total + sums[j];
        for (int64_t j = runs_of[i]; j < threads; ++j) total = total + M(0);
      }
      const M r = kind == Ord::kTwo ? std::sqrt(total)
                  : kind == Ord::kP ? std::pow(total, M(1) / p)
                                    : total;
      store(r, &result[i]);
    }
    return nullptr;
  });
  return out;
}

// Note [clipping's multiply]
// Every tensor times one scalar, as torch._foreach_mul_ multiplies each in list order. A
// tensor whose elements share memory (an expanded grad) is refused, as torch's in-place
// multiply refuses it, before anything is written (torch raises at that tensor, having
// multiplied those before it), and so even where the product is by exactly 1, which
// changes no bit and is skipped (torch multiplies anyway: on an accelerator asking would
// synchronise, on the CPU it is free). Where two entries share memory (one param twice in
// the list, two params with one grad tensor: torch multiplies the shared elements twice),
// the entries are multiplied one after the other in list order, on one thread; in one
// parallel region two threads raced on them (found by a review, 2026-12-06).
void mul_cpu(at::TensorList tensors, const at::Tensor& scalar) {
  constexpr const char* op = "fused_optim::_mul_";
  TORCH_CHECK(scalar.numel() == 1 && scalar.device().is_cpu(), op,
              ": expects a one-element CPU tensor as the scalar");
  if (tensors.empty()) return;
  const at::ScalarType dtype = tensors[0].scalar_type();
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && t.scalar_type() == dtype,
                op, ": expects dense CPU tensors of one dtype");
    if (t.numel() > 1) refuse_internal_overlap(t);
  }
  const double c = scalar.item<double>();
  if (c == 1.0) return;
  // (A 0-dim tensor times a 0-dim scalar of a wider dtype computes in the wider one, then
  // rounds: torch's own mul_ does those, as clip_grads_with_norm_ does.)
  auto in_loops = [](const at::Tensor& t) {
    return t.dim() > 0 && t.is_non_overlapping_and_dense() && !t.is_neg() && !t.is_conj() &&
           !t.is_complex();
  };
  // The bytes each tensor reaches (from its lowest element to past its highest).
  const bool shared = spans_overlap(static_cast<int64_t>(tensors.size()), [&](int64_t j) {
    const at::Tensor& t = tensors[j];
    const auto* base = static_cast<const char*>(t.const_data_ptr());
    int64_t lo = 0, hi = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) == 0) return std::make_pair(base, base);
      const int64_t reach = (t.size(d) - 1) * t.stride(d);
      (reach < 0 ? lo : hi) += reach;
    }
    const int64_t size = static_cast<int64_t>(t.element_size());
    return std::make_pair(base + lo * size, base + (hi + 1) * size);
  });
  std::vector<void*> ptrs;
  std::vector<int64_t> offsets{0};
  auto run = [&] {
    if (ptrs.empty()) return;
    dispatch_dtype(dtype, [&]<typename T>() -> SegmentFn {
      using M = at::opmath_type<T>;
      const M cm = static_cast<M>(c);
      auto body = [&](int64_t begin, int64_t end) {
        // The first tensor of the range, then on through the following ones.
        int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
        for (int64_t i = begin; i < end; ++k) {
          T* x = static_cast<T*>(ptrs[k]) - offsets[k];
          const int64_t stop = std::min(end, offsets[k + 1]);
#pragma GCC ivdep
          for (int64_t j = i; j < stop; ++j) store(cpu::load(x + j) * cm, x + j);
          i = stop;
        }
      };
      if (shared) {
        body(0, offsets.back());  // one thread, in list order
      } else {
        at::parallel_for(0, offsets.back(), kGrainSize, body);
      }
      return nullptr;
    });
    ptrs.clear();
    offsets.assign(1, 0);
  };
  for (const at::Tensor& t : tensors) {
    if (in_loops(t)) {
      ptrs.push_back(t.data_ptr());  // (asks for copy-on-write storage to materialize)
      offsets.push_back(offsets.back() + t.numel());
    } else {
      if (shared) run();  // (what comes before it in the list first)
      at::Tensor(t).mul_(scalar);
    }
  }
  run();
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("_norms", &norms_cpu);
  m.impl("_mul_", &mul_cpu);
}

}  // namespace fused_optim::cpu
