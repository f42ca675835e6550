// Shared declarations of the fused FRN op (schema in frn.cpp, kernels in cpu/ and cuda/).
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <optional>
#include <string>
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

// The centred variant's per-plane mean is float64 for every input dtype: an fp32 mean cannot centre a
// plane whose mean is large against its spread (mean 1e3, std 0.1: fp32's rounding of the mean
// alone is 3e-4 of a standard deviation). The kernels use it as hi + lo in the accumulation type
// (centre_of in cpu/frn_centered_kernel.cpp).
constexpr at::ScalarType centred_mean_type = at::kDouble;

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

// What every backend's kernels start from, made by the one shared prologue (frn.cpp:
// prepare_forward / prepare_backward, which each backend's op entry points call first): the
// arguments checked (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE, with the messages of the Python validator
// frn_det/layers/validation.py), x and grad_out in the layout the kernels read, the accumulation
// type, and the parameters converted to it.
struct FrnArgs {
  Layout layout;
  at::Tensor x;
  at::Tensor grad_out; // backward only, in `layout`
  at::Tensor rstd; // backward only, contiguous (N, C)
  at::Tensor mean; // frn_centered_backward only, contiguous (N, C) float64 (centred_mean_type)
  at::ScalarType acc;
  at::Tensor weight, bias, tau, eps_l; // acc dtype, contiguous; tau / eps_l undefined when absent
  at::Tensor weight_in, bias_in, tau_in, eps_l_in; // as given: the gradients take their dtypes
  double eps = 0;
  bool grad_input = false;
  int64_t N = 0, C = 0, L = 0;
};

using ForwardOut = std::tuple<at::Tensor, at::Tensor>; // out, rstd
using CenteredForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>; // out, mean, rstd
using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ParamGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>; // weight, bias, tau, eps_l

// Parameter gradients computed in the accumulation dtype, converted to the parameters' dtypes;
// grad_tau / grad_eps_l are empty (0,) tensors when tau / eps_l are absent.
ParamGrads to_param_dtypes(const FrnArgs& a, at::Tensor gw, at::Tensor gb, at::Tensor gt, at::Tensor ge);

// The shared prologue of the ops' backend kernels (schemas in frn.cpp). Each backend (cpu/, cuda/)
// registers its own entry points with TORCH_LIBRARY_IMPL(frn_det, CPU | CUDA, m); they call these
// first, then run their kernels.
FrnArgs prepare_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        const std::optional<at::Tensor>& tau, double eps, const std::optional<at::Tensor>& eps_l);
// With `mean` (frn_centered_backward): also checks the forward's mean ((N, C), centred_mean_type) and
// names frn_centered_backward in its messages.
FrnArgs prepare_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& bias, const std::optional<at::Tensor>& tau, const at::Tensor& rstd,
                         const std::optional<at::Tensor>& eps_l, bool grad_input, const at::Tensor* mean = nullptr);

// Limits the CUDA launchers obey, lowered by the tests through torch.ops.frn_det._set_test_limits
// so that small tensors reach the paths only large ones take otherwise: grid-stride loops over
// several planes per block or warp (max_grid > 0 caps every grid dimension that a kernel loops
// over), and the 64-bit index kernels (force_int64).
struct TestLimits {
  int64_t max_grid = 0;
  bool force_int64 = false;
};
TestLimits& test_limits();

// Choices among correct kernels, set at run time through torch.ops.frn_det._set_cuda_resident and
// _set_cpu_avx2
// (frn_det.layers.ops.cuda_resident_planes). cuda_resident: NCHW planes held on chip between the
// statistics and the output (one DRAM pass; cuda/frn_kernel.cu, plan_of); opt-in until it has
// passed tools/gpu_check.sh on a GPU; FRN_DET_CUDA_RESIDENT=1 in the environment turns it on at load.
// cpu_avx2: the CPU kernels' AVX2 build where the CPU has it (cpu/cpu_common.h, run_task), else the
// baseline build; on by default, FRN_DET_CPU_AVX2=0 turns it off at load (both give the same bits).
struct KernelOptions {
  std::atomic<bool> cuda_resident{false};
  std::atomic<bool> cpu_avx2{true};
};
KernelOptions& kernel_options();

// The build the CPU kernels run now: "avx2" or "baseline" (cpu/frn_kernel.cpp).
std::string cpu_isa();

} // namespace frn_det
