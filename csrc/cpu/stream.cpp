// fused_optim::_stream_: the bandwidth limit an optimizer step can reach. It streams
// memory with the optimizer's access pattern (every `inout` tensor read and written, every
// `read_only` tensor read) and almost no arithmetic, in the same kind of parallel region
// as the optimizer kernels, so the benchmark can report "% of the measured limit".
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace fused_optim::cpu {
namespace {

constexpr int kMaxStreams = 6;

template <typename T>
struct StreamArgs {
  T* inout[kMaxStreams];
  const T* read[kMaxStreams];
  int num_inout, num_read;
  float scale;
};

template <typename T, int NI, int NR>
FO_INLINE void stream_loop(const StreamArgs<T>& a, int64_t begin, int64_t end) {
  using M = at::opmath_type<T>;
  const M scale = static_cast<M>(a.scale);
  // Pointers in locals: stores through them cannot then change them, so the loop vectorizes.
  T* io[NI];
  const T* rd[NR];
  for (int k = 0; k < NI; ++k) io[k] = a.inout[k];
  for (int r = 0; r < NR; ++r) rd[r] = a.read[r];
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    M acc = M(0);
    for (int r = 0; r < NR; ++r) acc += load(rd[r] + i);
    for (int k = 0; k < NI; ++k) store(load(io[k] + i) * scale + acc, io[k] + i);
  }
}

template <typename T, int NI, int NR>
void stream_baseline(const StreamArgs<T>& a, int64_t b, int64_t e) { stream_loop<T, NI, NR>(a, b, e); }
#if FO_X86_CLONES
template <typename T, int NI, int NR>
FO_AVX2_TARGET void stream_avx2(const StreamArgs<T>& a, int64_t b, int64_t e) {
  stream_loop<T, NI, NR>(a, b, e);
}
template <typename T, int NI, int NR>
FO_AVX512_TARGET void stream_avx512(const StreamArgs<T>& a, int64_t b, int64_t e) {
  stream_loop<T, NI, NR>(a, b, e);
}
#endif

template <typename T, int NI, int NR>
void run_stream(const StreamArgs<T>& a, int64_t n) {
  auto fn = &stream_baseline<T, NI, NR>;
#if FO_X86_CLONES
  // (float32 and float64 as the loops of load-bound rules: Note [float loops in AVX2])
  const Isa isa = std::is_same_v<T, at::opmath_type<T>> ? float_loop_isa(true) : cpu_isa();
  if (isa == Isa::kAvx2) fn = &stream_avx2<T, NI, NR>;
  if (isa >= Isa::kAvx512) fn = &stream_avx512<T, NI, NR>;
#endif
  at::parallel_for(0, n, kGrainSize, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

// The optimizer patterns: (inout, read_only) = SGD (1,1), SGD+momentum (2,1),
// Adam (3,1), Adam+amsgrad (4,1); Adafactor's three passes (1,4): the param read twice and
// written once, the grad read three times, and for a 1-D param (2,4), its variance read
// twice and written once too, the grad read twice (Note [Adafactor's passes]); each with
// one read more where the step clips by the grads' norm (benchmarks/bench.py --clip).
template <typename T>
void stream_dispatch(const StreamArgs<T>& a, int64_t n) {
  switch (a.num_inout * 8 + a.num_read) {
    case 1 * 8 + 1: return run_stream<T, 1, 1>(a, n);
    case 2 * 8 + 1: return run_stream<T, 2, 1>(a, n);
    case 3 * 8 + 1: return run_stream<T, 3, 1>(a, n);
    case 4 * 8 + 1: return run_stream<T, 4, 1>(a, n);
    case 1 * 8 + 2: return run_stream<T, 1, 2>(a, n);
    case 2 * 8 + 2: return run_stream<T, 2, 2>(a, n);
    case 3 * 8 + 2: return run_stream<T, 3, 2>(a, n);
    case 4 * 8 + 2: return run_stream<T, 4, 2>(a, n);
    case 1 * 8 + 4: return run_stream<T, 1, 4>(a, n);
    case 1 * 8 + 5: return run_stream<T, 1, 5>(a, n);
    case 2 * 8 + 4: return run_stream<T, 2, 4>(a, n);
    case 2 * 8 + 5: return run_stream<T, 2, 5>(a, n);
    default:
      TORCH_CHECK(false, "fused_optim::_stream_: expects (inout, read-only) tensors of an "
                  "optimizer's pattern: (1 to 4, 1 or 2), (1 or 2, 4 or 5); got (",
                  a.num_inout, ", ", a.num_read, ")");
  }
}

void stream_cpu(at::TensorList inout, at::TensorList read_only, double scale) {
  constexpr const char* op = "fused_optim::_stream_";
  TORCH_CHECK(!inout.empty() && inout.size() <= kMaxStreams && read_only.size() <= kMaxStreams,
              op, ": expects 1 to ", kMaxStreams, " tensors per list");
  const at::Tensor& first = inout[0];
  auto check = [&](const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == first.scalar_type() &&
                    t.numel() == first.numel(),
                op, ": tensors must be contiguous CPU tensors of one dtype and size");
  };
  for (const auto& t : inout) check(t);
  for (const auto& t : read_only) check(t);
  auto run = [&]<typename T>() {
    StreamArgs<T> a{};
    a.num_inout = static_cast<int>(inout.size());
    a.num_read = static_cast<int>(read_only.size());
    a.scale = static_cast<float>(scale);
    for (int k = 0; k < a.num_inout; ++k) a.inout[k] = static_cast<T*>(inout[k].data_ptr());
    for (int r = 0; r < a.num_read; ++r) a.read[r] = static_cast<const T*>(read_only[r].data_ptr());
    stream_dispatch(a, first.numel());
  };
  if (first.element_size() == 2) {
    // 16-bit dtypes are streamed as 16-bit integers: the probe measures what moving these
    // bytes costs, not what converting them to float costs (that is the kernels' work).
    run.template operator()<uint16_t>();
    return;
  }
  dispatch_dtype(first.scalar_type(), [&]<typename T>() -> SegmentFn {
    run.template operator()<T>();
    return nullptr;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("_stream_", &stream_cpu); }

}  // namespace fused_optim::cpu
