#pragma once
// The state lists each op updates, in the rule's order (update_rules.h), from the op's
// arguments (csrc/ops.cpp): lists of options that are off must be empty. One copy for the
// CPU and CUDA kernels.

#include <ATen/core/Tensor.h>
#include <c10/core/DefaultDtype.h>
#include <c10/util/Exception.h>

#include <vector>

#include "plan.h"
#include "update_rules.h"

namespace fused_optim {

inline StateLists sgd_state_lists(const char* op, double momentum,
                                  at::TensorList momentum_buffers) {
  if (momentum != 0.0) return {{"momentum_buffers", momentum_buffers}};
  TORCH_CHECK(momentum_buffers.empty(), op, ": momentum_buffers must be empty when momentum is 0");
  return {};
}

inline StateLists adam_state_lists(const char* op, bool amsgrad, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs,
                                   at::TensorList max_exp_avg_sqs) {
  StateLists states{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) {
    states.add("max_exp_avg_sqs", max_exp_avg_sqs);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  }
  return states;
}

// `use_momentum`: momentum > 0, as torch tests it.
inline StateLists rmsprop_state_lists(const char* op, bool centered, bool use_momentum,
                                      at::TensorList square_avgs, at::TensorList grad_avgs,
                                      at::TensorList momentum_buffers) {
  StateLists states{{"square_avgs", square_avgs}};
  if (centered) {
    states.add("grad_avgs", grad_avgs);
  } else {
    TORCH_CHECK(grad_avgs.empty(), op, ": grad_avgs must be empty unless centered");
  }
  if (use_momentum) {
    states.add("momentum_buffers", momentum_buffers);
  } else {
    TORCH_CHECK(momentum_buffers.empty(), op,
                ": momentum_buffers must be empty unless momentum > 0");
  }
  return states;
}

// NAdam's coefficients for each tensor, after `mu_product *= mu` on each tensor's
// mu_product (Note [scalar states] in plan.h). The coefficients take the product as the
// state keeps it: a load into 16-bit params leaves mu_product in their dtype (torch casts
// every floating state but `step`), where torch's for-loop multiplies and rounds it, then
// reads it back.
inline std::vector<NadamCoeffs> nadam_step_coeffs(const NadamCoeffs& base, double lr,
                                                  bool lr_is_f32, const std::vector<double>& steps,
                                                  at::TensorList mu_products) {
  return per_tensor_coeffs(base, lr, lr_is_f32, steps, [&](size_t i, NadamCoeffs& c) {
    const at::Tensor& mu_product = mu_products[i];
    c.mu_product = round_to_dtype(
        c.next_mu_product(scalar_state_value(mu_product),
                          mu_product.scalar_type() != at::kDouble, steps[i]),
        mu_product.scalar_type());
    set_scalar_state(mu_product, c.mu_product);
  });
}

// ASGD's coefficients for each tensor, from its eta and mu, which are then updated for the
// next step (Note [scalar states] in plan.h). torch's for-loop computes the new values as
// Python floats (a Tensor lr: a tensor in its dtype) and copies torch.as_tensor(value),
// a tensor of the default dtype, into eta and mu: rounded to that dtype first, then to
// theirs (float64 after load_state_dict with float64 params).
inline std::vector<AsgdCoeffs> asgd_step_coeffs(const AsgdCoeffs& base, double lr,
                                                bool lr_is_f32, bool lr_is_tensor,
                                                const std::vector<double>& steps,
                                                at::TensorList etas, at::TensorList mus) {
  const at::ScalarType python_float = c10::get_default_dtype_as_scalartype();
  return per_tensor_coeffs(base, lr, lr_is_f32, steps, [&](size_t i, AsgdCoeffs& c) {
    c.eta = scalar_state_value(etas[i]);
    c.mu = scalar_state_value(mus[i]);
    const double eta = c.next_eta(lr, lr_is_f32, steps[i]);
    set_scalar_state(etas[i], lr_is_tensor ? eta : round_to_dtype(eta, python_float));
    set_scalar_state(mus[i], round_to_dtype(c.next_mu(steps[i]), python_float));
  });
}

}  // namespace fused_optim
