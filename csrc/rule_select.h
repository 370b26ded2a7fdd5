#pragma once
// Which update rule (update_rules.h) runs for a call's options and a tensor's dtype: one
// copy for every device. Options become template parameters here, at the edge, so the
// loops have no branches. `pick` is called as `pick.template operator()<T, Rule>()`, T the
// tensor's element type and Rule the update rule, and returns that device's function for
// them (a CPU segment loop, a CUDA kernel); every select_* returns what pick returns.

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "update_rules.h"

namespace fused_optim {

// Calls f.template operator()<T>() with T the C++ type of a real floating dtype.
template <typename F>
auto dispatch_dtype(at::ScalarType dtype, F&& f) -> decltype(f.template operator()<float>()) {
  switch (dtype) {
    case at::kFloat: return f.template operator()<float>();
    case at::kDouble: return f.template operator()<double>();
    case at::kBFloat16: return f.template operator()<c10::BFloat16>();
    case at::kHalf: return f.template operator()<c10::Half>();
    default: TORCH_CHECK(false, "fused_optim: unsupported dtype ", dtype);
  }
}

namespace detail {

// Rule<M, kFma> for the element type of `dtype`. `unfused_complex`: complex params (float
// and double only) take the kFma = false variant, where torch does that part of the update
// with complex arithmetic (see each rule in update_rules.h).
template <template <typename, bool> class Rule, bool kUnfusedComplex, typename Pick>
auto pick_rule(at::ScalarType dtype, bool complex, Pick& pick) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    using M = at::opmath_type<T>;
    if constexpr (kUnfusedComplex && std::is_same_v<T, M>) {
      if (complex) return pick.template operator()<T, Rule<M, false>>();
    }
    return pick.template operator()<T, Rule<M, true>>();
  });
}

template <bool kWD, Momentum kMomentum>
struct Sgd {
  template <typename M, bool kFma>
  using Rule = SgdRule<M, kWD, kMomentum, kFma>;
};
template <WeightDecay kWD, bool kAmsgrad>
struct Adam {
  template <typename M, bool kFma>
  using Rule = AdamRule<M, kWD, kAmsgrad, kFma>;
};
template <bool kWD, bool kCentered, bool kMomentum>
struct Rmsprop {
  template <typename M, bool kFma>
  using Rule = RmspropRule<M, kWD, kCentered, kMomentum, kFma>;
};
template <bool kWD>
struct Adagrad {
  template <typename M, bool kFma>
  using Rule = AdagradRule<M, kWD, kFma>;
};

template <bool kWD>
struct Adamax {
  template <typename M, bool kFma>
  using Rule = AdamaxRule<M, kWD, kFma>;
};

template <bool kWD>
struct Adadelta {
  template <typename M, bool kFma>
  using Rule = AdadeltaRule<M, kWD, kFma>;
};

template <template <typename, WeightDecay, bool> class R, WeightDecay kWD>
struct WithWeightDecay {
  template <typename M, bool kFma>
  using Rule = R<M, kWD, kFma>;
};

// R<M, kWD, kFma> for each WeightDecay mode, with real arithmetic for complex params too
// (the algorithms that view a complex param as real before anything else: NAdam, RAdam).
template <template <typename, WeightDecay, bool> class R, typename Pick>
auto select_real_weight_decay(at::ScalarType dtype, bool complex, WeightDecay wd, Pick& pick) {
  switch (wd) {
    case WeightDecay::kL2:
      return pick_rule<WithWeightDecay<R, WeightDecay::kL2>::template Rule, false>(dtype, complex,
                                                                                  pick);
    case WeightDecay::kDecoupled:
      return pick_rule<WithWeightDecay<R, WeightDecay::kDecoupled>::template Rule, false>(
          dtype, complex, pick);
    case WeightDecay::kNone: break;
  }
  return pick_rule<WithWeightDecay<R, WeightDecay::kNone>::template Rule, false>(dtype, complex,
                                                                                pick);
}

template <bool kWD>
struct Asgd {
  template <typename M, bool kFma>
  using Rule = AsgdRule<M, kWD, kFma>;
};

template <bool kWD, typename Pick>
auto select_sgd_momentum(at::ScalarType dtype, bool complex, Momentum momentum, Pick& pick) {
  // torch updates complex SGD params with complex arithmetic throughout.
  switch (momentum) {
    case Momentum::kFirstStep:
      return pick_rule<Sgd<kWD, Momentum::kFirstStep>::template Rule, true>(dtype, complex, pick);
    case Momentum::kFirstStepNesterov:
      return pick_rule<Sgd<kWD, Momentum::kFirstStepNesterov>::template Rule, true>(dtype, complex, pick);
    case Momentum::kUpdate:
      return pick_rule<Sgd<kWD, Momentum::kUpdate>::template Rule, true>(dtype, complex, pick);
    case Momentum::kUpdateNesterov:
      return pick_rule<Sgd<kWD, Momentum::kUpdateNesterov>::template Rule, true>(dtype, complex, pick);
    case Momentum::kNone: break;
  }
  return pick_rule<Sgd<kWD, Momentum::kNone>::template Rule, true>(dtype, complex, pick);
}

template <WeightDecay kWD, typename Pick>
auto select_adam_wd(at::ScalarType dtype, bool complex, bool amsgrad, Pick& pick) {
  // Only the L2 term of a complex param is complex arithmetic (torch takes the real view
  // after it).
  constexpr bool kUnfused = kWD == WeightDecay::kL2;
  return amsgrad ? pick_rule<Adam<kWD, true>::template Rule, kUnfused>(dtype, complex, pick)
                 : pick_rule<Adam<kWD, false>::template Rule, kUnfused>(dtype, complex, pick);
}

template <bool kWD, typename Pick>
auto select_rmsprop_wd(at::ScalarType dtype, bool complex, bool centered, bool momentum,
                       Pick& pick) {
  if (centered) {
    return momentum ? pick_rule<Rmsprop<kWD, true, true>::template Rule, kWD>(dtype, complex, pick)
                    : pick_rule<Rmsprop<kWD, true, false>::template Rule, kWD>(dtype, complex, pick);
  }
  return momentum ? pick_rule<Rmsprop<kWD, false, true>::template Rule, kWD>(dtype, complex, pick)
                  : pick_rule<Rmsprop<kWD, false, false>::template Rule, kWD>(dtype, complex, pick);
}

}  // namespace detail

template <typename Pick>
auto select_sgd(at::ScalarType dtype, bool complex, bool weight_decay, Momentum momentum,
                Pick&& pick) {
  return weight_decay ? detail::select_sgd_momentum<true>(dtype, complex, momentum, pick)
                      : detail::select_sgd_momentum<false>(dtype, complex, momentum, pick);
}

template <typename Pick>
auto select_adam(at::ScalarType dtype, bool complex, WeightDecay wd, bool amsgrad, Pick&& pick) {
  switch (wd) {
    case WeightDecay::kL2:
      return detail::select_adam_wd<WeightDecay::kL2>(dtype, complex, amsgrad, pick);
    case WeightDecay::kDecoupled:
      return detail::select_adam_wd<WeightDecay::kDecoupled>(dtype, complex, amsgrad, pick);
    case WeightDecay::kNone: break;
  }
  return detail::select_adam_wd<WeightDecay::kNone>(dtype, complex, amsgrad, pick);
}

template <typename Pick>
auto select_rmsprop(at::ScalarType dtype, bool complex, bool weight_decay, bool centered,
                    bool momentum, Pick&& pick) {
  return weight_decay ? detail::select_rmsprop_wd<true>(dtype, complex, centered, momentum, pick)
                      : detail::select_rmsprop_wd<false>(dtype, complex, centered, momentum, pick);
}

template <typename Pick>
auto select_adagrad(at::ScalarType dtype, bool complex, bool weight_decay, Pick&& pick) {
  // As Adam: only the L2 term of a complex param is complex arithmetic.
  return weight_decay
             ? detail::pick_rule<detail::Adagrad<true>::template Rule, true>(dtype, complex, pick)
             : detail::pick_rule<detail::Adagrad<false>::template Rule, false>(dtype, complex, pick);
}

template <typename Pick>
auto select_adamax(at::ScalarType dtype, bool complex, bool weight_decay, Pick&& pick) {
  // As Adam: only the L2 term of a complex param is complex arithmetic.
  return weight_decay
             ? detail::pick_rule<detail::Adamax<true>::template Rule, true>(dtype, complex, pick)
             : detail::pick_rule<detail::Adamax<false>::template Rule, false>(dtype, complex, pick);
}

template <typename Pick>
auto select_adadelta(at::ScalarType dtype, bool complex, bool weight_decay, Pick&& pick) {
  // The param's update is complex arithmetic whatever the weight decay (AdadeltaRule).
  return weight_decay
             ? detail::pick_rule<detail::Adadelta<true>::template Rule, true>(dtype, complex, pick)
             : detail::pick_rule<detail::Adadelta<false>::template Rule, true>(dtype, complex, pick);
}

template <typename Pick>
auto select_nadam(at::ScalarType dtype, bool complex, WeightDecay wd, Pick&& pick) {
  return detail::select_real_weight_decay<NadamRule>(dtype, complex, wd, pick);
}

template <typename Pick>
auto select_radam(at::ScalarType dtype, bool complex, WeightDecay wd, Pick&& pick) {
  return detail::select_real_weight_decay<RadamRule>(dtype, complex, wd, pick);
}

template <typename Pick>
auto select_rprop(at::ScalarType dtype, bool complex, Pick&& pick) {
  // Real arithmetic throughout, complex params included (RpropRule).
  return detail::pick_rule<RpropRule, false>(dtype, complex, pick);
}

template <typename Pick>
auto select_asgd(at::ScalarType dtype, bool complex, bool weight_decay, Pick&& pick) {
  // Real arithmetic throughout, complex params included (AsgdRule).
  return weight_decay
             ? detail::pick_rule<detail::Asgd<true>::template Rule, false>(dtype, complex, pick)
             : detail::pick_rule<detail::Asgd<false>::template Rule, false>(dtype, complex, pick);
}

// The WeightDecay of Adam's options.
inline WeightDecay adam_weight_decay(double weight_decay, bool decoupled) {
  return weight_decay == 0.0 ? WeightDecay::kNone
         : decoupled         ? WeightDecay::kDecoupled
                             : WeightDecay::kL2;
}

// SGD's Momentum mode for its options.
inline Momentum sgd_momentum(double momentum, bool nesterov, bool is_first_step) {
  if (momentum == 0.0) return Momentum::kNone;
  if (is_first_step) return nesterov ? Momentum::kFirstStepNesterov : Momentum::kFirstStep;
  return nesterov ? Momentum::kUpdateNesterov : Momentum::kUpdate;
}

}  // namespace fused_optim
