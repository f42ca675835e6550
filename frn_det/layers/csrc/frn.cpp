// Schema of the fused FRN op (torch.ops.frn_det), shared argument checks and helpers, the
// parameter-gradient epilogue of the CUDA backend, and the Python module init that makes `import frn_det._C` load
// this library (which runs the TORCH_LIBRARY registrations below and in cpu/, cuda/).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "frn.h"

extern "C" {
// An empty module: the op is reached through torch.ops.frn_det, not through this module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Fused FRN kernels, registered as torch.ops.frn_det", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace frn_det {

Layout layout_of(const at::Tensor& x) {
  if (x.is_contiguous()) {
    return Layout::NCHW;
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return Layout::NHWC;
  }
  return Layout::NCHW; // arbitrary strides: copied to contiguous by to_layout
}

at::Tensor empty_cpu_output(const at::Tensor& x, Layout layout) {
  at::Tensor out = at::empty_like(x, memory_format_of(layout));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(out.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (out.nbytes() >= 4 * kHuge && last > first) {
    // A hint: ignored where THP is disabled, harmless for memory that is already resident.
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

at::Tensor to_layout(const at::Tensor& x, Layout layout) {
  return layout == Layout::NHWC ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
}

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_param(const char* name, const at::Tensor& p, const at::Tensor& x) {
  TORCH_CHECK(
      p.dim() == 1 && p.size(0) == x.size(1),
      "frn: ", name, " must have shape (", x.size(1), ",) to match the input's ", x.size(1),
      " channels, got shape ", p.sizes());
  TORCH_CHECK(
      is_supported_float(p.scalar_type()),
      "frn: ", name, " must be float16, bfloat16, float32 or float64, got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), "frn: ", name, " is on ", p.device(), " but x is on ", x.device());
}

void check_eps_l(const std::optional<at::Tensor>& eps_l, const at::Tensor& x) {
  if (!eps_l.has_value()) {
    return;
  }
  TORCH_CHECK(eps_l->numel() == 1, "frn: eps_l must be a scalar tensor, got shape ", eps_l->sizes());
  TORCH_CHECK(
      is_supported_float(eps_l->scalar_type()),
      "frn: eps_l must be float16, bfloat16, float32 or float64, got ", eps_l->scalar_type());
  TORCH_CHECK(eps_l->device() == x.device(), "frn: eps_l is on ", eps_l->device(), " but x is on ", x.device());
}

} // namespace

void check_forward_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    const std::optional<at::Tensor>& eps_l) {
  TORCH_CHECK(x.dim() == 4, "frn: x must be 4D (N, C, H, W), got ", x.dim(), "D with shape ", x.sizes());
  TORCH_CHECK(
      is_supported_float(x.scalar_type()),
      "frn: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  check_param("weight", weight, x);
  check_param("bias", bias, x);
  if (tau.has_value()) {
    check_param("tau", *tau, x);
  }
  check_eps_l(eps_l, x);
}

void check_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& eps_l) {
  check_forward_args(x, weight, bias, tau, eps_l);
  TORCH_CHECK(
      grad_out.sizes() == x.sizes(), "frn_backward: grad_out has shape ", grad_out.sizes(),
      " but x has shape ", x.sizes());
  TORCH_CHECK(
      grad_out.scalar_type() == x.scalar_type(), "frn_backward: grad_out is ", grad_out.scalar_type(),
      " but x is ", x.scalar_type());
  TORCH_CHECK(
      grad_out.device() == x.device(), "frn_backward: grad_out is on ", grad_out.device(), " but x is on ",
      x.device());
  TORCH_CHECK(
      rstd.dim() == 2 && rstd.size(0) == x.size(0) && rstd.size(1) == x.size(1),
      "frn_backward: rstd must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", rstd.sizes());
  TORCH_CHECK(
      rstd.scalar_type() == acc_type_for(x.scalar_type()), "frn_backward: rstd must be ",
      acc_type_for(x.scalar_type()), " for ", x.scalar_type(), " input, got ", rstd.scalar_type());
  TORCH_CHECK(rstd.device() == x.device(), "frn_backward: rstd is on ", rstd.device(), " but x is on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> param_grads_from_plane_sums(
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& T,
    const at::Tensor& rstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    const std::optional<at::Tensor>& eps_l) {
  // dL/dgamma = sum dy * x_hat = sum_n rstd * A;  dL/dbeta = sum_n B;  dL/dtau = sum_n T.
  const at::Tensor A_rstd = A.mul(rstd);
  at::Tensor grad_weight = A_rstd.sum(0).to(weight.scalar_type());
  at::Tensor grad_bias = B.sum(0).to(bias.scalar_type());
  at::Tensor grad_tau = tau.has_value() ? T.sum(0).to(tau->scalar_type())
                                        : at::empty({0}, A.options());
  at::Tensor grad_eps_l;
  if (eps_l.has_value()) {
    // dL/d(eps_eff) = sum over planes of -0.5 * sum_plane(dx_hat * x) * rstd^3, dx_hat = gamma * dy;
    // eps_eff = eps + |eps_l| so d(eps_eff)/d(eps_l) = sign(eps_l) (0 at 0, as autograd's abs).
    const at::Tensor gamma = weight.to(A.scalar_type()).reshape({1, -1});
    const at::Tensor d_eps_eff = A_rstd.mul(rstd).mul(rstd).mul(gamma).sum().mul(-0.5);
    grad_eps_l = d_eps_eff.mul(eps_l->to(A.scalar_type()).sign().reshape({}))
                     .reshape(eps_l->sizes())
                     .to(eps_l->scalar_type());
  } else {
    grad_eps_l = at::empty({0}, A.options());
  }
  return {grad_weight, grad_bias, grad_tau, grad_eps_l};
}

} // namespace frn_det

TORCH_LIBRARY(frn_det, m) {
  // Returns the normalised (+ TLU) output in x's dtype and memory format, and the per-plane
  // 1 / sqrt(mean(x^2) + eps + |eps_l|) of shape (N, C) in fp32 (fp64 for fp64 x) for backward.
  m.def("frn(Tensor x, Tensor weight, Tensor bias, Tensor? tau, float eps, Tensor? eps_l) -> (Tensor out, Tensor rstd)");
  // Gradients of frn. grad_x is computed only when grad_input (else an empty (0,) tensor);
  // grad_tau / grad_eps_l are empty (0,) tensors when tau / eps_l are None.
  m.def(
      "frn_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor? tau, Tensor rstd, "
      "Tensor? eps_l, bool grad_input) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_tau, Tensor grad_eps_l)");
}
