// Shared declarations of the fused FRN op (schema in frn.cpp, kernels in cpu/ and cuda/).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace frn_det {

// Statistics accumulate in fp64 for fp64 input, fp32 otherwise (fp16 x^2 overflows at |x| >= 256).
inline at::ScalarType acc_type_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The same rule as a type, for the kernels (CPU and CUDA).
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Memory layouts the kernels read natively; anything else is made contiguous first.
enum class Layout { NCHW, NHWC };

// NCHW when x is (or, after .contiguous(), will be) contiguous; NHWC for dense channels_last input.
// A tensor that is both (C == 1 or H*W == 1) takes NCHW: the element offsets are the same.
Layout layout_of(const at::Tensor& x);

// The memory format of the op's outputs (explicit, so that the fake kernels can match the strides
// even where both formats describe the same memory, e.g. 1x1 planes).
inline at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Allocates an output like x (in x's kernel layout) for the CPU kernels. Large buffers are marked
// for transparent huge pages before their first touch: the kernels write every byte, and on
// Linux the 4 KiB page faults of a fresh multi-MB buffer otherwise cost more than the op's
// arithmetic (measured: 34 MB output, 25 ms with 4 KiB faults vs 10 ms with huge pages).
at::Tensor empty_cpu_output(const at::Tensor& x, Layout layout);

// Returns x in the layout the kernels read (a no-op for contiguous or channels_last x).
at::Tensor to_layout(const at::Tensor& x, Layout layout);

// TORCH_CHECKs with argument names, repeated by every backend and by the Python fake kernels.
void check_forward_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    const std::optional<at::Tensor>& eps_l);

void check_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& eps_l);

// Parameter gradients from the per-plane sums the backward kernels produce (all (N, C), acc dtype),
// with tensor ops (used by the CUDA backend; the CPU backend does the same sums in plain loops):
//   A = sum_plane(dy * x), B = sum_plane(dy), T = sum_plane(g where y < tau).
// Returns (grad_weight, grad_bias, grad_tau, grad_eps_l), each in its parameter's dtype and shape;
// grad_tau / grad_eps_l are empty (shape (0,)) when tau / eps_l are absent. No host sync.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> param_grads_from_plane_sums(
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& T,
    const at::Tensor& rstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    const std::optional<at::Tensor>& eps_l);

} // namespace frn_det
