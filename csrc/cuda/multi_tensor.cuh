#pragma once
// The CUDA multi-tensor machinery every algorithm shares: the launches over many tensors,
// the element loop, and how scalar arguments reach the kernels. An algorithm brings only
// its checks and coefficients (cuda/<algo>.cu); the per-element math is its rule in
// update_rules.h, the same source the CPU loops run, and the checks and layout handling
// are the CPU's (MultiTensorPlan, plan.h).
//
// Note [CUDA bits]
// The rules spell out every fused multiply-add (::fma), and the CUDA sources are built with
// -fmad=false and IEEE division and square root (nvcc's defaults without fast math), so a
// CUDA kernel computes each element exactly as the CPU kernels do: where lr and the steps
// live on the host (the for-loop's usual state), a CUDA step gives the bits a CPU step
// gives. Where they live on the device (capturable and fused groups, a CUDA Tensor lr), the
// coefficients are computed on the GPU (Note [per-step coefficients]).

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>  // CUDART_VERSION

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/quant8.h"
#include "plan.h"
#include "rounding.h"
#include "rule_select.h"
#include "update_rules.h"

namespace fused_optim::cuda {

// Note [CUDA launches]
// One launch covers up to kTensors tensors, each cut into chunks of kChunk elements, one
// thread block per chunk (a chunk never straddles two tensors), with no cap on a launch's
// blocks below the grid's own (2^31 - 1). Both ends matter on the GPU:
//  - Big tensors want many small chunks in few launches. A launch of a few hundred blocks
//    (the old layout: at most 320 chunks of 65536 elements, 512 threads) is little more
//    than one wave of an H100 (132 SMs x 2 such blocks of float32 Adam, at 48 registers a
//    thread) and ends in a wave that leaves most of the GPU idle: W1 Adam ran at 82-83% of
//    the copy bandwidth with it, 91-92% with this one.
//  - Many small tensors want many tensors per launch: each launch costs host time and a
//    ramp. W3 Adam (5,000 tensors) went from 3.0 to 1.8 ms/step with 48 tensors a launch
//    instead of 24, and from 2.8 to 1.5 ms with 160 instead of 48 (each pair in one run on
//    an H100, CUDA 13.0; W3's times vary from run to run).
// Everything a launch needs travels in its by-value kernel argument: no host-to-device
// copy is made, and a launch captured in a CUDA graph owns its own copy. CUDA 12.1 raised
// that argument's limit from 4 KB to 32 KB (32,764 bytes; Volta or newer, and a driver of
// CUDA 12.1 or newer), which holds 160 tensors; builds with an older toolkit or a target
// architecture before Volta (setup.py then leaves FUSED_OPTIM_CUDA_BIG_ARGS undefined) get
// 48. Each block finds its tensor by a binary search of block_start. The plan leaves empty
// tensors out. The coefficients of up to kCoeffSets distinct steps ride along (a group's
// params usually share one step); a launch ends early when a tensor would need another.
#if defined(FUSED_OPTIM_CUDA_BIG_ARGS) && defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kTensors = 160;
constexpr size_t kMaxArgBytes = 32764;
#else
constexpr int kTensors = 48;
constexpr size_t kMaxArgBytes = 4096;
#endif
constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;
constexpr int kCoeffSets = 4;
constexpr int kPtrs = 2 + kMaxRuleStates;  // param, grad, the rule's states
// The storage kernels' launches (Note [storage on CUDA]): fewer tensors, each with more.
#if defined(FUSED_OPTIM_CUDA_BIG_ARGS) && defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kStorageTensors = 160;
#else
constexpr int kStorageTensors = 16;
#endif

// A float32 or float64 scalar (lr, grad_scale, found_inf, a step) in device memory.
__device__ __forceinline__ double read_scalar(const void* ptr, bool is_double) {
  return is_double ? *static_cast<const double*>(ptr)
                   : static_cast<double>(*static_cast<const float*>(ptr));
}

// A scalar in device memory, or a value known on the host.
struct Scalar {
  const void* ptr = nullptr;
  bool is_double = false;
  double value = 0.0;

  __device__ __forceinline__ double get() const {
    return ptr == nullptr ? value : read_scalar(ptr, is_double);
  }
};

// N tensors, P pointers each (param, grad, states).
template <typename Coeffs, int N = kTensors, int P = kPtrs>
struct LaunchArgs {
  static constexpr int kN = N;
  void* ptr[P][N];
  int64_t numel[N];
  const void* step[N];  // device steps (capturable / fused groups), else null
  uint8_t step_is_double[N];
  uint8_t coeff_set[N];
  int32_t block_start[N];  // the first block of each tensor's chunks, ascending
  int32_t tensors;
  Coeffs coeffs[kCoeffSets];
  Scalar lr, grad_scale, found_inf;
  bool lr_is_f32;
  bool device_coeffs;  // recompute each tensor's coefficients on the GPU
  bool unscale;        // a GradScaler's grads: unscaled, and the unscaled grad stored
};

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = static_cast<int>(16 / sizeof(T));
  T v[kSize];
};

// The tensor of a launch's block: the last whose first block is <= block.
__device__ __forceinline__ int block_tensor(const int32_t* block_start, int tensors, int32_t block) {
  int t = 0, hi = tensors - 1;
  while (t < hi) {
    const int mid = (t + hi + 1) / 2;
    if (block_start[mid] <= block) {
      t = mid;
    } else {
      hi = mid - 1;
    }
  }
  return t;
}

// What a launch's thread block works on: its tensor t, elements [begin, end) of it, the
// coefficients (recomputed on the GPU where the call says: Note [per-step coefficients]),
// and the grads' unscaling factor (GradScaler.unscale_ multiplies by
// scale.double().reciprocal().float(); 1 without a scaler).
template <typename Coeffs>
struct BlockWork {
  int t;
  int64_t begin, end;
  Coeffs coeffs;
  float inv_scale;

  template <int N, int P>
  __device__ __forceinline__ explicit BlockWork(const LaunchArgs<Coeffs, N, P>& a) {
    const int32_t block = static_cast<int32_t>(blockIdx.x);
    t = block_tensor(a.block_start, a.tensors, block);
    const int64_t numel = a.numel[t];
    begin = static_cast<int64_t>(block - a.block_start[t]) * kChunk;
    end = numel < begin + kChunk ? numel : begin + kChunk;
    coeffs = a.coeffs[a.coeff_set[t]];
    if (a.device_coeffs) {
      const double step = a.step[t] == nullptr ? 0.0 : read_scalar(a.step[t], a.step_is_double[t]);
      coeffs.at(a.lr.get(), a.lr_is_f32, step);
    }
    inv_scale = a.unscale ? static_cast<float>(1.0 / a.grad_scale.get()) : 1.0f;
  }
};

template <typename T, typename Rule>
__global__ void __launch_bounds__(kThreads) update_kernel(const LaunchArgs<typename Rule::Coeffs> a) {
  using M = at::opmath_type<T>;
  constexpr int NS = Rule::kStates;
  constexpr int kS = NS > 0 ? NS : 1;
  if (a.found_inf.get() != 0.0) return;  // GradScaler found inf/NaN: skip the step
  const BlockWork<typename Rule::Coeffs> w(a);
  const int t = w.t;
  const int64_t begin = w.begin, end = w.end;
  const Rule rule(w.coeffs);
  const M inv_scale = static_cast<M>(w.inv_scale);

  T* p = static_cast<T*>(a.ptr[0][t]);
  T* g = static_cast<T*>(a.ptr[1][t]);
  T* s[kS];
  for (int k = 0; k < NS; ++k) s[k] = static_cast<T*>(a.ptr[2 + k][t]);

  // One element, in opmath precision (float for 16-bit types), as the CPU loops do it.
  auto update = [&](T& pe, T& ge, auto&& state) {
    M pv = static_cast<M>(pe);
    M gv = static_cast<M>(ge);
    if (a.unscale) {
      gv = gv * inv_scale;
      ge = static_cast<T>(gv);
      gv = static_cast<M>(ge);  // Note [the unscaled grad as stored] (cpu/multi_tensor.h)
    }
    M sv[kS];
    for (int k = 0; k < NS; ++k) sv[k] = static_cast<M>(state(k));
    rule(pv, gv, sv);
    pe = static_cast<T>(pv);
    for (int k = 0; k < NS; ++k) state(k) = static_cast<T>(sv[k]);
  };

  // 16-byte loads and stores where every pointer allows them (a chunk starts at a multiple
  // of kChunk elements, so only the tensors' own addresses matter); indices are int64.
  uintptr_t bits = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g);
  for (int k = 0; k < NS; ++k) bits |= reinterpret_cast<uintptr_t>(s[k]);
  int64_t i = begin;
  if (bits % 16 == 0) {
    constexpr int kV = Pack<T>::kSize;
    const int64_t packs = (end - begin) / kV;
    for (int64_t v = threadIdx.x; v < packs; v += kThreads) {
      const int64_t at = begin + v * kV;
      Pack<T> pp = *reinterpret_cast<const Pack<T>*>(p + at);
      Pack<T> gp = *reinterpret_cast<const Pack<T>*>(g + at);
      Pack<T> sp[kS];
      for (int k = 0; k < NS; ++k) sp[k] = *reinterpret_cast<const Pack<T>*>(s[k] + at);
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        update(pp.v[j], gp.v[j], [&](int k) -> T& { return sp[k].v[j]; });
      }
      // (the grad first, the param last, as the scalar tail and the CPU loops store them:
      // a grad that is its param's memory holds the updated param after the step)
      if (a.unscale) *reinterpret_cast<Pack<T>*>(g + at) = gp;
      *reinterpret_cast<Pack<T>*>(p + at) = pp;
      for (int k = 0; k < NS; ++k) *reinterpret_cast<Pack<T>*>(s[k] + at) = sp[k];
    }
    i = begin + packs * kV;
  }
  for (int64_t e = i + threadIdx.x; e < end; e += kThreads) {
    update(p[e], g[e], [&](int k) -> T& { return s[k][e]; });
  }
}

// Note [storage on CUDA]
// The param storage modes (Note [param storage] in plan.h) and state_dtype (Note [state
// storage]) on CUDA: one kernel per rule, storage_kernel, whose tensors' dtypes and mode
// are read at run time (as the CPU's storage_loop), so that one copy serves float32,
// bfloat16 and float16 params and every state dtype. Each element is computed as the CPU
// loops compute it: widened to float as its dtype says (the param from its master copy, or
// plus its compensation), updated by the rule in float (Note [CUDA bits]), stored as its
// dtype and the mode say: rounded to nearest, the Kahan pair, stochastically rounded with
// the bits of rounding.h (the stream counted on the host, plan.next_rounding_streams), or
// quantized. So a step on CUDA gives the CPU kernels' bits, but for NaNs' payloads (the
// GPU's conversions and arithmetic make other NaNs than x86's).
// Note [8-bit state on CUDA]
// A launch's block walks its chunk kThreads = kQuantBlock elements at a time, one element
// a thread, so each 256-element quantization block (Note [8-bit state] in cpu/quant8.h) is
// one pass of one thread block: its absolute maximum, whether a value is negative and
// whether one is NaN are reduced across the block (warp shuffles, then shared memory), and
// each thread finds its code with cpu/quant8.h's q8_code, on a device copy of the CPU's
// maps (device_quant8_maps: the same table, so the same code for every float, NaN and
// infinities included).
enum StorageDtype : uint8_t { kStoreF32 = 0, kStoreBF16 = 1, kStoreF16 = 2, kStoreU8 = 3 };

template <typename Coeffs>
struct StorageLaunchArgs {
  // ptr[2 + the rule's states]: the mode's buffer (kahan_comp, master_param), where it has one
  LaunchArgs<Coeffs, kStorageTensors, 2 + kMaxStates> base;
  uint64_t stream[kStorageTensors];  // stochastic rounding's stream of this step
  float* scale[kMaxRuleStates][kStorageTensors];  // an 8-bit state's block scales
  uint8_t param_dtype[kStorageTensors];           // StorageDtype (float32, bfloat16, float16)
  uint8_t state_dtype[kMaxRuleStates][kStorageTensors];  // StorageDtype
  uint8_t mode;                                          // ParamMode
  const cpu::Quant8Maps* maps;                           // device_quant8_maps, where needed
};

__device__ __forceinline__ float load_as_float(const void* base, uint8_t dtype, int64_t i) {
  switch (dtype) {
    case kStoreBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    case kStoreF16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// x rounded to nearest in `dtype` (as the update kernel stores T).
__device__ __forceinline__ void store_float(void* base, uint8_t dtype, int64_t i, float x) {
  switch (dtype) {
    case kStoreBF16: static_cast<c10::BFloat16*>(base)[i] = static_cast<c10::BFloat16>(x); break;
    case kStoreF16: static_cast<c10::Half*>(base)[i] = static_cast<c10::Half>(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}

__device__ __forceinline__ float bits_float(uint32_t u) { return __uint_as_float(u); }

// x rounded to nearest in `dtype` (as store_float stores it), widened back to float.
__device__ __forceinline__ float rounded_as(float x, uint8_t dtype) {
  switch (dtype) {
    case kStoreBF16: return static_cast<float>(static_cast<c10::BFloat16>(x));
    case kStoreF16: return static_cast<float>(static_cast<c10::Half>(x));
    default: return x;
  }
}

// Note [8-bit state on CUDA]: the block's values v (one a thread; `valid` false for the
// threads past a tensor's end, which take no part) quantized as cpu/quant8.h's q8_quantize
// does: codes[i] for the valid ones, and the block's scale (by thread 0). Every thread of
// the block calls it.
__device__ __forceinline__ void quantize_block(float v, bool valid, int64_t i, uint8_t* codes,
                                               float* scale, const cpu::Quant8Maps* maps) {
  constexpr int kWarps = kThreads / 32;
  __shared__ uint32_t warp_magnitude[kWarps];
  __shared__ uint32_t warp_negative[kWarps];
  // The largest |v| as bits: ordered as the floats for everything but NaN, whose bits are
  // above every number's (and whose block takes NaN as its scale, below).
  uint32_t magnitude = valid ? (float_bits(v) & 0x7FFFFFFFu) : 0u;
  uint32_t negative = valid && v < 0.0f ? 1u : 0u;
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) {
    const uint32_t m = __shfl_xor_sync(0xFFFFFFFFu, magnitude, lane_mask);
    magnitude = m > magnitude ? m : magnitude;
    negative |= __shfl_xor_sync(0xFFFFFFFFu, negative, lane_mask);
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) {
    warp_magnitude[warp] = magnitude;
    warp_negative[warp] = negative;
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    magnitude = warp_magnitude[w] > magnitude ? warp_magnitude[w] : magnitude;
    negative |= warp_negative[w];
  }
  __syncthreads();  // (the next block's reduction reuses the shared words)
  // (a NaN or an infinity: the block is NaN, Note [8-bit state] in quant8.h)
  const bool nan = magnitude >= 0x7F800000u;
  const float amax = nan ? bits_float(0x7FC00000u) : bits_float(magnitude);  // (NAN, as the CPU)
  const int u = (negative != 0 || nan) ? 0 : 1;  // the signed map, or the unsigned one
  if (threadIdx.x == 0) *scale = u ? -amax : amax;
  if (valid) {
    const float x = amax > 0.0f ? v / amax : 0.0f;
    codes[i] = static_cast<uint8_t>(cpu::q8_code(x, maps->entry[u]));
  }
}

template <typename Rule>
__global__ void __launch_bounds__(kThreads) storage_kernel(
    const StorageLaunchArgs<typename Rule::Coeffs> sa) {
  static_assert(kThreads == cpu::kQuantBlock, "Note [8-bit state on CUDA]: a pass is a block");
  const auto& a = sa.base;
  using M = float;
  constexpr int NS = Rule::kStates;
  constexpr int kS = NS > 0 ? NS : 1;
  if (a.found_inf.get() != 0.0) return;  // GradScaler found inf/NaN: skip the step
  const BlockWork<typename Rule::Coeffs> w(a);
  const int t = w.t;
  const int64_t begin = w.begin, end = w.end;
  const Rule rule(w.coeffs);
  const M inv_scale = static_cast<M>(w.inv_scale);
  const ParamMode mode = static_cast<ParamMode>(sa.mode);
  const uint8_t pt = sa.param_dtype[t];
  void* p = a.ptr[0][t];
  void* g = a.ptr[1][t];
  void* buffer = a.ptr[2 + NS][t];  // kahan_comp or master_param
  void* s[kS];
  uint8_t st[kS];
  float* scale[kS];
  for (int k = 0; k < NS; ++k) {
    s[k] = a.ptr[2 + k][t];
    st[k] = sa.state_dtype[k][t];
    scale[k] = sa.scale[k][t];
  }
  const uint64_t stream = sa.stream[t];

  // (every thread runs every pass: a pass's quantization is the whole block's)
  for (int64_t at = begin; at < end; at += kThreads) {
    const int64_t i = at + static_cast<int64_t>(threadIdx.x);
    const bool valid = i < end;
    M pv = 0.0f;
    M sv[kS] = {};
    if (valid) {
      if (mode == ParamMode::kMaster) {
        // Note [master follows the param] (plan.h): a master that does not round to the
        // param's bits takes the param's value.
        pv = static_cast<const float*>(buffer)[i];
        const float param = load_as_float(p, pt, i);
        if (float_bits(rounded_as(pv, pt)) != float_bits(param)) pv = param;
      } else {
        pv = load_as_float(p, pt, i);
        if (mode == ParamMode::kKahan) pv = pv + load_as_float(buffer, pt, i);
      }
      M gv = load_as_float(g, pt, i);
      if (a.unscale) {
        gv = gv * inv_scale;
        store_float(g, pt, i, gv);  // the unscaled grad, stored back
        gv = rounded_as(gv, pt);  // Note [the unscaled grad as stored] (cpu/multi_tensor.h)
      }
      for (int k = 0; k < NS; ++k) {
        if (st[k] == kStoreU8) {
          const float sk = scale[k][i / cpu::kQuantBlock];
          const float* value = sa.maps->value[float_bits(sk) >> 31];  // (its sign: the map)
          sv[k] = value[static_cast<const uint8_t*>(s[k])[i]] * fabsf(sk);
        } else {
          sv[k] = load_as_float(s[k], st[k], i);
        }
      }
      rule(pv, gv, sv);
    }
    for (int k = 0; k < NS; ++k) {
      if (st[k] == kStoreU8) {  // (the same for every thread of the block)
        quantize_block(sv[k], valid, i, static_cast<uint8_t*>(s[k]),
                       scale[k] + at / cpu::kQuantBlock, sa.maps);
      } else if (valid) {
        store_float(s[k], st[k], i, sv[k]);
      }
    }
    if (!valid) continue;
    switch (mode) {
      case ParamMode::kMaster:
        static_cast<float*>(buffer)[i] = pv;
        store_float(p, pt, i, pv);
        break;
      case ParamMode::kKahan: {
        store_float(p, pt, i, pv);
        store_float(buffer, pt, i, pv - load_as_float(p, pt, i));  // exact: what rounding lost
        break;
      }
      case ParamMode::kStochastic: {  // Note [stochastic rounding] in rounding.h
        const uint32_t bits = rounding_bits(stream, static_cast<uint64_t>(i));
        if (pt == kStoreBF16) {
          static_cast<c10::BFloat16*>(p)[i].x = bf16_stochastic_bits(pv, bits);
        } else {
          store_float(p, pt, i, f16_stochastic_float(pv, bits));
        }
        break;
      }
      default:
        store_float(p, pt, i, pv);
    }
  }
}

template <typename Coeffs>
using Kernel = void (*)(LaunchArgs<Coeffs>);
template <typename Coeffs>
using StorageKernel = void (*)(StorageLaunchArgs<Coeffs>);

// A (T, Rule)'s kernels: the update kernel, and where T's math is float (float32 and
// 16-bit params) the storage kernel (Note [storage on CUDA]), null otherwise.
template <typename Coeffs>
struct CudaKernel {
  Kernel<Coeffs> update = nullptr;
  StorageKernel<Coeffs> storage = nullptr;
  bool operator==(const CudaKernel& o) const { return update == o.update && storage == o.storage; }
  bool operator!=(const CudaKernel& o) const { return !(*this == o); }
};

// The CUDA kernels of (T, Rule) for the select_* functions of rule_select.h.
template <typename Coeffs>
struct PickKernel {
  template <typename T, typename Rule>
  CudaKernel<Coeffs> operator()() const {
    static_assert(std::is_same_v<typename Rule::Coeffs, Coeffs>);
    static_assert(sizeof(LaunchArgs<Coeffs>) <= kMaxArgBytes,
                  "a launch's argument must fit in the kernel argument limit");
    static_assert(sizeof(StorageLaunchArgs<Coeffs>) <= kMaxArgBytes,
                  "a storage launch's argument must fit in the kernel argument limit");
    CudaKernel<Coeffs> k;
    k.update = &update_kernel<T, Rule>;
    // (not for the rules of complex params, kFmaVariant false: the modes and state_dtype
    // take float32 and 16-bit real params only, and the plan refuses the others)
    if constexpr (std::is_same_v<at::opmath_type<T>, float> && Rule::kFmaVariant) {
      k.storage = &storage_kernel<Rule>;
    }
    return k;
  }
};

// The device copy of cpu/quant8.h's maps on `device` (Note [8-bit state on CUDA]): made at
// the first 8-bit step there, kept for the process.
const cpu::Quant8Maps* device_quant8_maps(c10::Device device);

// How one call's scalar arguments reach its kernels (Note [CUDA scalars] in multi_tensor.cu).
struct CallScalars {
  Scalar lr, grad_scale, found_inf;
  double lr_value = 0.0;  // lr, where it is read on the host
  bool lr_is_f32 = false;
  bool unscale = false;
  bool device_coeffs = false;
  bool skip = false;  // found_inf, read on the host, says: skip this step
};

// `device`: the call's device. `host_steps`: the call has steps and they are CPU tensors
// (then everything is read on the host, as the for-loop does: lr, found_inf, the steps).
CallScalars call_scalars(const char* op, c10::Device device, double lr,
                         const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, bool host_steps,
                         bool steps_on_device);

// Adds 1 to each step tensor on the device, unless found_inf (on the device) is nonzero.
void increment_device_steps(at::TensorList steps, const Scalar& found_inf);

// The device of a call: params[0]'s, or none when there is no CUDA params[0] (an empty
// call; otherwise MultiTensorPlan raises the error).
std::optional<c10::Device> call_device(at::TensorList params);

// A launch's common part.
template <typename C, int N, int P>
LaunchArgs<C, N, P>& launch_base(LaunchArgs<C, N, P>& a) { return a; }
template <typename C>
auto& launch_base(StorageLaunchArgs<C>& a) { return a.base; }

// A tensor's dtype as the storage kernel reads it (Note [storage on CUDA]).
uint8_t storage_dtype(at::ScalarType dtype);

// Runs the plan's tensors through the kernels `select(real dtype, is complex)` returns, in
// as few launches as Note [CUDA launches] allows, on the current stream, then writes back
// the plan's layout temporaries. `coeffs` holds one struct per tensor of the call, or a
// single one for all; `device_steps` is the call's steps where they live on the device.
// Args: LaunchArgs (the update kernels) or StorageLaunchArgs (the storage kernels, for a
// plan with mixed storage: Note [storage on CUDA]).
template <typename Args, typename Coeffs, typename Select>
void launch_with(MultiTensorPlan& plan, const std::vector<Coeffs>& coeffs,
                 at::TensorList device_steps, const CallScalars& sc, Select&& select) {
  constexpr bool kStorage = std::is_same_v<Args, StorageLaunchArgs<Coeffs>>;
  using KernelPtr = void (*)(Args);
  constexpr int64_t kMaxGrid = INT32_MAX;  // blocks in one launch (gridDim.x's limit)
  const int64_t entries = plan.num_entries();
  // Stochastic rounding's streams of this step, counted now (as the CPU's run counts them,
  // whether or not a param has elements).
  std::vector<uint64_t> streams;
  // Every entry's kernel, before anything runs (a plan's params of a dtype the storage
  // kernels do not take: refused here, not after some launches).
  std::vector<KernelPtr> kernels(static_cast<size_t>(entries));
  for (int64_t j = 0; j < entries; ++j) {
    const int64_t i = plan.entry_index(j);
    const bool same_kind = j > 0 && plan.real_dtype(i) == plan.real_dtype(plan.entry_index(j - 1)) &&
                           plan.is_complex(i) == plan.is_complex(plan.entry_index(j - 1));
    if (same_kind) {
      kernels[j] = kernels[j - 1];
    } else if constexpr (kStorage) {
      kernels[j] = select(plan.real_dtype(i), plan.is_complex(i)).storage;
      TORCH_CHECK(kernels[j] != nullptr, "fused_optim: a param storage mode or state_dtype "
                  "applies to float32, bfloat16 and float16 real params only");
    } else {
      kernels[j] = select(plan.real_dtype(i), plan.is_complex(i)).update;
    }
  }
  if (kStorage && plan.param_mode() == ParamMode::kStochastic) {
    streams = plan.next_rounding_streams();
  }
  if (entries == 0) {
    plan.finish();
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Args full{};
  auto& args = launch_base(full);
  constexpr int kN = std::remove_reference_t<decltype(args)>::kN;
  args.lr = sc.lr;
  args.grad_scale = sc.grad_scale;
  args.found_inf = sc.found_inf;
  args.lr_is_f32 = sc.lr_is_f32;
  args.device_coeffs = sc.device_coeffs;
  args.unscale = sc.unscale;
  if constexpr (kStorage) {
    full.mode = static_cast<uint8_t>(plan.param_mode());
    if (plan.has_quantized_states()) {
      full.maps = device_quant8_maps(c10::Device(c10::kCUDA, c10::cuda::current_device()));
    }
  }

  KernelPtr kernel = nullptr;
  int tensors = 0, sets = 0;
  int64_t blocks = 0;
  auto flush = [&] {
    if (blocks > 0) {
      args.tensors = tensors;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(full);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    tensors = sets = 0;
    blocks = 0;
  };
  // Puts entry j, `chunks` blocks, in the launch being built.
  auto add_tensor = [&](int64_t j, int64_t chunks) {
    if (tensors == kN || blocks + chunks > kMaxGrid) flush();
    const int64_t i = plan.entry_index(j);
    const Coeffs& c = coeffs[coeffs.size() == 1 ? 0 : i];
    int set = -1;
    for (int q = 0; q < sets && set < 0; ++q) {
      if (std::memcmp(&args.coeffs[q], &c, sizeof(Coeffs)) == 0) set = q;
    }
    if (set < 0) {
      if (sets == kCoeffSets) flush();
      set = sets++;
      args.coeffs[set] = c;
    }
    const int slot = tensors++;
    const TensorPtrs& tp = plan.entry(j);
    args.ptr[0][slot] = tp.param;
    args.ptr[1][slot] = tp.grad;
    for (int k = 0; k < plan.num_states(); ++k) args.ptr[2 + k][slot] = tp.state[k];
    args.numel[slot] = plan.entry_numel(j);
    args.step[slot] = device_steps.empty() ? nullptr : device_steps[i].const_data_ptr();
    args.step_is_double[slot] =
        !device_steps.empty() && device_steps[i].scalar_type() == at::kDouble;
    args.coeff_set[slot] = static_cast<uint8_t>(set);
    args.block_start[slot] = static_cast<int32_t>(blocks);
    if constexpr (kStorage) {
      const int ns = plan.num_states();
      // the mode's buffer: the plan's last state list (Note [param storage])
      args.ptr[2 + ns][slot] = plan.has_storage_buffer() ? tp.state[ns] : nullptr;
      full.param_dtype[slot] = storage_dtype(tp.param_dtype);
      for (int k = 0; k < ns; ++k) {
        full.state_dtype[k][slot] = storage_dtype(tp.state_dtype[k]);
        full.scale[k][slot] = tp.state_scale[k];
      }
      full.stream[slot] = streams.empty() ? 0 : streams[static_cast<size_t>(i)];
    }
    blocks += chunks;
  };
  for (int64_t j = 0; j < entries; ++j) {
    // (entries that share memory: one launch each, in list order, which the stream runs
    // one after the other: Note [aliased params] in plan.cpp)
    if (plan.serial()) {
      // (the entry before, launched; its layout temporaries copied back, stream-ordered,
      // before this entry's are copied in)
      flush();
      if (j > 0) plan.end_serial_entry(j - 1);
      plan.begin_serial_entry(j);
      kernel = kernels[j];
    } else if (kernels[j] != kernel) {
      flush();
      kernel = kernels[j];
    }
    const int64_t chunks = (plan.entry_numel(j) + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= kMaxGrid, "fused_optim: a tensor of ", plan.entry_numel(j),
                " elements is too large");
    add_tensor(j, chunks);
  }
  flush();
  if (plan.serial()) plan.end_serial_entry(entries - 1);
  plan.finish();
}

template <typename Coeffs, typename Select>
void launch_update(MultiTensorPlan& plan, const std::vector<Coeffs>& coeffs,
                   at::TensorList device_steps, const CallScalars& sc, Select&& select) {
  if (plan.mixed_storage()) {
    launch_with<StorageLaunchArgs<Coeffs>>(plan, coeffs, device_steps, sc, select);
  } else {
    launch_with<LaunchArgs<Coeffs>>(plan, coeffs, device_steps, sc, select);
  }
}

// What every CUDA op call does around its own coefficients: the device guard, the plan
// (every check, before anything changes), where the steps live, the scalar arguments
// (Note [CUDA scalars]), counting the step, and the launches. `storage`: the op's
// param_mode and param_aux (Note [param storage], Note [state storage]).
class CudaCall {
 public:
  // `steps`: the call's step tensors, or nullopt for an op without them (SGD).
  CudaCall(const char* op, at::TensorList params, at::TensorList grads,
           const StateLists& states, std::optional<at::TensorList> steps,
           double lr, const std::optional<at::Tensor>& lr_tensor,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
           const ParamStorage& storage = {})
      : device_(call_device(params)),
        guard_(device_),
        plan_(op, params, grads, states, has_tensor(grad_scale), c10::DeviceType::CUDA, storage),
        steps_(steps.value_or(at::TensorList())),
        has_steps_(steps.has_value()),
        device_steps_(has_steps_ && check_steps(op, steps_, plan_.size(), device_)) {
    if (device_.has_value()) {
      // Stochastic rounding's counter is counted on the host at each step (Note [storage on
      // CUDA]): a captured step would replay one step's random bits. Refused before
      // anything is read on the host, lr and found_inf included (such a read of a CUDA
      // tensor during a capture fails with CUDA's own error and breaks the capture; found
      // by a review, 2026-12-06).
      TORCH_CHECK(storage.mode != ParamMode::kStochastic ||
                      c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                          c10::cuda::CaptureStatus::None,
                  "fused_optim: stochastic_rounding cannot be captured in a CUDA graph: its "
                  "counter is counted on the host at each step, so every replay would round "
                  "with one step's random bits");
      sc_ = call_scalars(op, *device_, lr, lr_tensor, grad_scale, found_inf,
                         /*host_steps=*/has_steps_ && !device_steps_, device_steps_);
      // Stochastic rounding counts its step on the host (Note [storage on CUDA]): a step
      // that found_inf skips must not count there either, so found_inf is read here too.
      if (storage.mode == ParamMode::kStochastic && !sc_.skip) sc_.skip = skip_step(found_inf);
    }
  }

  // False: nothing to update (no params, or found_inf, read on the host, says skip, or
  // only the checks were asked for: Note [every group checked first] in plan.h).
  bool updates() const { return device_.has_value() && !sc_.skip && !checking_only_now(); }

  // Counts this step (a kernel for steps on the device, the host otherwise), then returns
  // the coefficients for the kernels: `base` at lr, and at each tensor's new step where
  // `per_step` and the steps live on the host; `base` alone where the kernels compute them
  // (Note [per-step coefficients]).
  template <typename Coeffs>
  std::vector<Coeffs> count_step(Coeffs base, bool per_step) {
    std::vector<double> host_steps;
    if (device_steps_) {
      increment_device_steps(steps_, sc_.found_inf);
    } else if (has_steps_) {
      host_steps = increment_steps(steps_);
    }
    if (sc_.device_coeffs) return {base};
    if (per_step) return per_step_coeffs(base, sc_.lr_value, sc_.lr_is_f32, host_steps);
    base.at(sc_.lr_value, sc_.lr_is_f32, 0.0);
    return {base};
  }

  // Counts this step on the host and returns `coeffs_at(new steps, lr, lr_is_f32)`: for
  // coefficients that also read scalar states on the host (Note [scalar states]); only
  // for calls whose steps are CPU tensors (device_steps() is false).
  template <typename CoeffsAt>
  auto count_step_on_host(CoeffsAt&& coeffs_at) {
    TORCH_INTERNAL_ASSERT(!device_steps_ && !sc_.device_coeffs);
    return coeffs_at(has_steps_ ? increment_steps(steps_) : std::vector<double>(), sc_.lr_value,
                     sc_.lr_is_f32);
  }

  // The steps are on the GPU (capturable and fused groups).
  bool device_steps() const { return device_steps_; }

  template <typename Coeffs, typename Select>
  void launch(const std::vector<Coeffs>& coeffs, Select&& select) {
    launch_update(plan_, coeffs, device_steps_ ? steps_ : at::TensorList(), sc_,
                  std::forward<Select>(select));
  }

 private:
  std::optional<c10::Device> device_;
  c10::cuda::OptionalCUDAGuard guard_;
  MultiTensorPlan plan_;
  at::TensorList steps_;
  bool has_steps_;
  bool device_steps_;
  CallScalars sc_;
};

}  // namespace fused_optim::cuda
