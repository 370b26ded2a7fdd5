#pragma once
// The CPU kernels of gradient clipping (grad_norm.cpp): registered as the ops
// fused_optim::_norms and fused_optim::_mul_, and called directly by the _C functions
// that clip.py uses in eager mode (python_step.cpp).

#include <ATen/core/Tensor.h>

namespace fused_optim::cpu {

// The ord-norm (any norm type torch.linalg.vector_norm takes) of each tensor (all CPU tensors of one real floating dtype), as
// a 1-D tensor of that dtype, as torch.linalg.vector_norm computes each (Note [global
// norm]); of the tensors times inv_scale, rounded to their dtype, where inv_scale != 1.
at::Tensor norms_cpu(at::TensorList tensors, double ord, double inv_scale);

// tensors[i] *= scalar, as Tensor.mul_ with a 0-dim tensor does it on the CPU: in the
// tensors' opmath type (the scalar converted to it), rounded to their dtype. Elementwise,
// so the order does not matter: all elements of all dense tensors are split over the
// threads; other layouts call Tensor.mul_ on the calling thread.
void mul_cpu(at::TensorList tensors, const at::Tensor& scalar);

}  // namespace fused_optim::cpu
