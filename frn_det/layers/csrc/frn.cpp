// Schema of the fused FRN op (torch.ops.frn_det), the prologue every backend's entry points share
// (argument checks, layout, accumulation type, parameter upcasts), and the Python module init that
// makes `import frn_det._C` load this library (which runs the TORCH_LIBRARY registration below and
// the TORCH_LIBRARY_IMPL registrations of cpu/, cuda/ and frn_autograd.cpp).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
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

void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(
      is_supported_float(t.scalar_type()),
      "frn: ", name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "frn: ", name, " is on ", t.device(), " but x is on ", x.device());
}

// The op's kernel for backends without their own (cpu/, cuda/ register those): CUDA tensors in a
// build without CUDA kernels, and other devices. The checks run first, as on every backend.
[[noreturn]] void no_kernels_for(const at::Tensor& x) {
  TORCH_CHECK(x.device().type() != c10::DeviceType::CUDA,
              "frn: frn_det._C was built without CUDA kernels (rebuild with FORCE_CUDA=1 and a CUDA toolkit)");
  TORCH_CHECK_VALUE(false, "frn: no kernels for ", x.device().type(), " tensors (CPU and CUDA only)");
}

ForwardOut frn_without_kernels(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& tau, double eps,
                               const std::optional<at::Tensor>& eps_l) {
  no_kernels_for(prepare_forward(x, weight, bias, tau, eps, eps_l).x);
}

BackwardOut frn_backward_without_kernels(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& bias, const std::optional<at::Tensor>& tau,
                                         const at::Tensor& rstd, const std::optional<at::Tensor>& eps_l,
                                         bool grad_input) {
  no_kernels_for(prepare_backward(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input).x);
}

// The centred variant has CPU kernels only so far: on CUDA tensors it says so (NotImplementedError).
[[noreturn]] void no_centered_kernels_for(const at::Tensor& x) {
  if (x.device().type() == c10::DeviceType::CUDA) {
    C10_THROW_ERROR(NotImplementedError,
                    "frn_centered: the centred variant has CPU kernels only (no CUDA kernels yet); run it with "
                    "impl='reference' (or 'auto') on CUDA tensors");
  }
  no_kernels_for(x);
}

CenteredForwardOut frn_centered_without_kernels(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                const std::optional<at::Tensor>& tau, double eps,
                                                const std::optional<at::Tensor>& eps_l) {
  no_centered_kernels_for(prepare_forward(x, weight, bias, tau, eps, eps_l).x);
}

BackwardOut frn_centered_backward_without_kernels(const at::Tensor& grad_out, const at::Tensor& x,
                                                  const at::Tensor& weight, const at::Tensor& bias,
                                                  const std::optional<at::Tensor>& tau, const at::Tensor& mean,
                                                  const at::Tensor& rstd, const std::optional<at::Tensor>& eps_l,
                                                  bool grad_input) {
  no_centered_kernels_for(prepare_backward(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input, &mean).x);
}

void set_test_limits(int64_t max_grid, bool force_int64) {
  TORCH_CHECK_VALUE(max_grid >= 0, "_set_test_limits: max_grid must be >= 0 (0: no limit), got ", max_grid);
  test_limits() = TestLimits{max_grid, force_int64};
}

bool set_cuda_resident(bool enabled) {
  return kernel_options().cuda_resident.exchange(enabled);
}

bool set_cpu_avx2(bool enabled) {
  return kernel_options().cpu_avx2.exchange(enabled);
}

// The CUDA kernels' plan is only defined for CUDA tensors (cuda/ registers the real one).
std::string cuda_plan_without_kernels(const at::Tensor& x, bool /*backward*/) {
  TORCH_CHECK_VALUE(false, "_cuda_plan: x must be a CUDA tensor in a build with CUDA kernels, got a ",
                    x.device().type(), " tensor");
}

} // namespace

FrnArgs prepare_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        const std::optional<at::Tensor>& tau, double eps, const std::optional<at::Tensor>& eps_l) {
  TORCH_CHECK_VALUE(x.dim() == 4, "frn: x must be 4D (N, C, H, W), got ", x.dim(), "D with shape ", x.sizes());
  check_float("x", x);
  auto check_param = [&](const char* name, const at::Tensor& p) {
    TORCH_CHECK_VALUE(
        p.dim() == 1 && p.size(0) == x.size(1),
        "frn: ", name, " must have shape (", x.size(1), ",) to match the input's ", x.size(1),
        " channels, got shape ", p.sizes());
    check_float(name, p);
    check_device(name, p, x);
  };
  check_param("weight", weight);
  check_param("bias", bias);
  if (tau.has_value()) {
    check_param("tau", *tau);
  }
  if (eps_l.has_value()) {
    TORCH_CHECK_VALUE(eps_l->numel() == 1, "frn: eps_l must be a scalar tensor, got shape ", eps_l->sizes());
    check_float("eps_l", *eps_l);
    check_device("eps_l", *eps_l, x);
  }
  TORCH_CHECK_VALUE(eps >= 0, "frn: eps must be >= 0, got ", eps);

  FrnArgs a;
  a.layout = layout_of(x);
  a.x = to_layout(x, a.layout);
  a.acc = acc_type_for(x.scalar_type());
  a.weight_in = weight;
  a.bias_in = bias;
  a.weight = weight.to(a.acc).contiguous();
  a.bias = bias.to(a.acc).contiguous();
  if (tau.has_value()) {
    a.tau_in = *tau;
    a.tau = tau->to(a.acc).contiguous();
  }
  if (eps_l.has_value()) {
    a.eps_l_in = *eps_l;
    a.eps_l = eps_l->to(a.acc).contiguous();
  }
  a.eps = eps;
  a.N = a.x.size(0);
  a.C = a.x.size(1);
  a.L = a.x.size(2) * a.x.size(3);
  return a;
}

FrnArgs prepare_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& bias, const std::optional<at::Tensor>& tau, const at::Tensor& rstd,
                         const std::optional<at::Tensor>& eps_l, bool grad_input, const at::Tensor* mean) {
  const char* op = mean != nullptr ? "frn_centered_backward" : "frn_backward";
  FrnArgs a = prepare_forward(x, weight, bias, tau, 0.0, eps_l);
  TORCH_CHECK_VALUE(
      grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
      " but x has shape ", x.sizes());
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == x.scalar_type(), op, ": grad_out is ", grad_out.scalar_type(),
      " but x is ", x.scalar_type());
  check_device("grad_out", grad_out, x);
  auto check_stat = [&](const char* name, const at::Tensor& t, at::ScalarType dtype) {
    TORCH_CHECK_VALUE(
        t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1),
        op, ": ", name, " must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", t.sizes());
    TORCH_CHECK_TYPE(
        t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " for ", x.scalar_type(),
        " input, got ", t.scalar_type());
    check_device(name, t, x);
  };
  if (mean != nullptr) {
    check_stat("mean", *mean, centred_mean_type);
    a.mean = mean->contiguous();
  }
  check_stat("rstd", rstd, a.acc);
  a.grad_out = to_layout(grad_out, a.layout);
  a.rstd = rstd.contiguous();
  a.grad_input = grad_input;
  return a;
}

TestLimits& test_limits() {
  static TestLimits limits;
  return limits;
}

KernelOptions& kernel_options() {
  static KernelOptions options{[] {
                                 const char* env = std::getenv("FRN_DET_CUDA_RESIDENT");
                                 return env != nullptr && std::string(env) == "1";
                               }(),
                               [] {
                                 const char* env = std::getenv("FRN_DET_CPU_AVX2");
                                 return env == nullptr || std::string(env) != "0";
                               }()};
  return options;
}

ParamGrads to_param_dtypes(const FrnArgs& a, at::Tensor gw, at::Tensor gb, at::Tensor gt, at::Tensor ge) {
  return {gw.to(a.weight_in.scalar_type()), gb.to(a.bias_in.scalar_type()),
          a.tau_in.defined() ? gt.to(a.tau_in.scalar_type()) : at::empty({0}, a.x.options().dtype(a.acc)),
          a.eps_l_in.defined() ? ge.reshape(a.eps_l_in.sizes()).to(a.eps_l_in.scalar_type())
                               : at::empty({0}, a.x.options().dtype(a.acc))};
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
  // The centred variant (InstanceNorm + affine + TLU, FRN's centred variant): per plane
  // mean m = mean_hw(x), rstd = 1 / sqrt(mean_hw((x - m)^2) + eps + |eps_l|),
  // out = TLU((x - m) * rstd * weight + bias). mean is (N, C) float64 for every dtype (frn.h,
  // centred_mean_type), rstd (N, C) fp32 (fp64 for fp64 x). A 1x1 plane has variance 0: its output
  // is exactly bias (before the TLU) whenever eps + |eps_l| > 0, as is a constant plane's.
  m.def(
      "frn_centered(Tensor x, Tensor weight, Tensor bias, Tensor? tau, float eps, Tensor? eps_l) "
      "-> (Tensor out, Tensor mean, Tensor rstd)");
  // Gradients of frn_centered, with frn_backward's conventions for grad_input and absent tau / eps_l.
  m.def(
      "frn_centered_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor? tau, Tensor mean, "
      "Tensor rstd, Tensor? eps_l, bool grad_input) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_tau, Tensor grad_eps_l)");
}

// For the tests only: see TestLimits in frn.h. Not part of the op's API.
TORCH_LIBRARY_FRAGMENT(frn_det, m) {
  m.def("_set_test_limits(int max_grid, bool force_int64) -> ()", &frn_det::set_test_limits);
  // KernelOptions (frn.h): turns resident CUDA planes on or off, returns the previous setting.
  m.def("_set_cuda_resident(bool enabled) -> bool", &frn_det::set_cuda_resident);
  // Which CUDA kernels frn (or, backward, frn_backward with grad_x) runs for an aligned x:
  // "warp", "block", "split", "span:G" (G planes per block) or "resident:K" (K blocks per plane).
  // Resident planes for which no cluster fits at launch (MPS or MIG limits) run the split path.
  m.def("_cuda_plan(Tensor x, bool backward) -> str");
  // Which path the CPU kernels of frn and frn_centered take for x at the current thread count:
  // "planes" or "split" (NCHW), "samples" or "rows" (channels_last); cpu/cpu_common.h has the rule.
  m.def("_cpu_plan(Tensor x) -> str");
  // KernelOptions: lets the CPU kernels run their AVX2 build (where the CPU has it) or not, returns
  // the previous setting; _cpu_isa names the build the CPU kernels run now: "avx2" or "baseline".
  m.def("_set_cpu_avx2(bool enabled) -> bool", &frn_det::set_cpu_avx2);
  m.def("_cpu_isa() -> str", &frn_det::cpu_isa);
}

// The backends' kernels register themselves in cpu/ and cuda/. The dispatcher uses a
// CompositeExplicitAutograd kernel only for a backend that has none of its own, so this one gives
// those backends the op's errors instead of the dispatcher's. (Meta takes the fake kernels that
// ops.py registers for it directly.)
TORCH_LIBRARY_IMPL(frn_det, CompositeExplicitAutograd, m) {
  m.impl("frn", &frn_det::frn_without_kernels);
  m.impl("frn_backward", &frn_det::frn_backward_without_kernels);
  m.impl("frn_centered", &frn_det::frn_centered_without_kernels);
  m.impl("frn_centered_backward", &frn_det::frn_centered_backward_without_kernels);
  m.impl("_cuda_plan", &frn_det::cuda_plan_without_kernels);
}
