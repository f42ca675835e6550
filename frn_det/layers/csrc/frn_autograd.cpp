// Autograd of torch.ops.frn_det.frn and frn_centered, in C++ so that a call runs no Python: torch.library's Python
// autograd wrapper cost as much host time per call as the kernels take on small maps (docs/gpu.md).
// Forward and backward reach the kernels through the dispatcher, so fake tensors (torch.compile,
// opcheck) take the fake kernels registered in ops.py. frn_backward is not differentiable: its
// autograd kernel makes a double backward fail with a clear error instead of torch's fallback
// warning and a wrong (missing) gradient; frn_centered_backward likewise.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "frn.h"

namespace frn_det {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

OptTensor defined_or_none(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

template <typename Signature>
struct ReturnOf;

template <typename Out, typename... Args>
struct ReturnOf<Out(Args...)> {
  using type = Out;
};

using FrnSignature = ForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double,
                                const OptTensor&);
using FrnBackwardSignature = BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const at::Tensor&, const OptTensor&, bool);

// The ops' dispatcher handles: a call through them reaches the kernels below the Autograd key (or
// the fake kernels).
using FrnCenteredSignature = CenteredForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const OptTensor&, double, const OptTensor&);
using FrnCenteredBackwardSignature = BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const OptTensor&, const at::Tensor&,
                                                 const at::Tensor&, const OptTensor&, bool);

const c10::TypedOperatorHandle<FrnSignature>& frn_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("frn_det::frn", "").typed<FrnSignature>();
  return op;
}

const c10::TypedOperatorHandle<FrnBackwardSignature>& frn_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("frn_det::frn_backward", "").typed<FrnBackwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<FrnCenteredSignature>& frn_centered_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("frn_det::frn_centered", "").typed<FrnCenteredSignature>();
  return op;
}

const c10::TypedOperatorHandle<FrnCenteredBackwardSignature>& frn_centered_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("frn_det::frn_centered_backward", "")
                             .typed<FrnCenteredBackwardSignature>();
  return op;
}

// The autograd of a norm op whose forward returns (out, stats...) and whose backward op takes
// (grad_out, x, weight, bias, tau, stats..., eps_l, grad_input): frn (stats: rstd) and frn_centered
// (mean, rstd). The stats are per plane and never get a gradient.
template <typename Signature, const c10::TypedOperatorHandle<Signature>& (*Forward)(), typename BackwardSignature,
          const c10::TypedOperatorHandle<BackwardSignature>& (*Backward)()>
class NormFunction : public torch::autograd::Function<NormFunction<Signature, Forward, BackwardSignature, Backward>> {
  static constexpr size_t kStats = std::tuple_size_v<typename ReturnOf<Signature>::type> - 1;

 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& weight,
      const at::Tensor& bias,
      const OptTensor& tau,
      double eps,
      const OptTensor& eps_l) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list outs = std::apply([](auto&&... t) { return variable_list{t...}; },
                                    Forward().call(x, weight, bias, tau, eps, eps_l));
    const variable_list stats(outs.begin() + 1, outs.end());
    ctx->mark_non_differentiable(stats);
    // No gradient flows into the stats: don't let autograd allocate and zero-fill one.
    ctx->set_materialize_grads(false);
    // x and the per-plane stats are the only activation-sized state; the parameters are needed to
    // recompute y for the TLU mask.
    variable_list saved{x, weight, bias, tau.value_or(at::Tensor()), eps_l.value_or(at::Tensor())};
    saved.insert(saved.end(), stats.begin(), stats.end());
    ctx->save_for_backward(saved);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &tau = saved[3], &eps_l = saved[4];
    // Grads are not materialised: an undefined one means zero.
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(x);
    // x is always the first input with an autograd edge; its gradient is the only large one.
    const bool grad_input = ctx->needs_input_grad(0);
    auto [grad_x, grad_weight, grad_bias, grad_tau, grad_eps_l] =
        call_backward(grad_out, saved, grad_input, std::make_index_sequence<kStats>());
    // One gradient per forward argument; undefined for eps (a float) and for absent tau / eps_l.
    return {grad_input ? grad_x : at::Tensor(),
            grad_weight,
            grad_bias,
            tau.defined() ? grad_tau : at::Tensor(),
            at::Tensor(),
            eps_l.defined() ? grad_eps_l : at::Tensor()};
  }

 private:
  template <size_t... I>
  static BackwardOut call_backward(const at::Tensor& grad_out, const variable_list& saved, bool grad_input,
                                   std::index_sequence<I...>) {
    return Backward().call(grad_out, saved[0], saved[1], saved[2], defined_or_none(saved[3]), saved[5 + I]...,
                           defined_or_none(saved[4]), grad_input);
  }
};

using FrnFunction = NormFunction<FrnSignature, frn_op, FrnBackwardSignature, frn_backward_op>;
using FrnCenteredFunction =
    NormFunction<FrnCenteredSignature, frn_centered_op, FrnCenteredBackwardSignature, frn_centered_backward_op>;

// The Autograd-key kernel of a backward op (Op: its dispatcher handle): runs it, and refuses to be
// differentiated.
template <typename Signature, const c10::TypedOperatorHandle<Signature>& (*Op)()>
class NotDifferentiable : public torch::autograd::Function<NotDifferentiable<Signature, Op>> {
 public:
  // The backward op's arguments, as its Autograd-key kernel received them.
  template <typename... Args>
  static variable_list forward(AutogradContext* /*ctx*/, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return std::apply([](auto&&... grads) { return variable_list{grads...}; }, Op().call(args...));
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    C10_THROW_ERROR(NotImplementedError,
                    "frn: double backward (a gradient of FRN's gradient, e.g. after create_graph=True) is not "
                    "implemented");
  }
};

using FrnBackwardFunction = NotDifferentiable<FrnBackwardSignature, frn_backward_op>;
using FrnCenteredBackwardFunction = NotDifferentiable<FrnCenteredBackwardSignature, frn_centered_backward_op>;

// The Autograd-key kernel of an op whose outputs are `Function`'s outputs, in order.
template <typename Function, typename Signature>
struct AutogradKernel;

template <typename Function, typename Out, typename... Args>
struct AutogradKernel<Function, Out(Args...)> {
  static Out call(Args... args) {
    const variable_list outs = Function::apply(args...);
    return as_tuple(outs, std::make_index_sequence<std::tuple_size_v<Out>>());
  }

  template <size_t... I>
  static Out as_tuple(const variable_list& outs, std::index_sequence<I...>) {
    return Out{outs[I]...};
  }
};

} // namespace
} // namespace frn_det

TORCH_LIBRARY_IMPL(frn_det, Autograd, m) {
  using frn_det::AutogradKernel;
  m.impl("frn", &AutogradKernel<frn_det::FrnFunction, frn_det::FrnSignature>::call);
  m.impl("frn_backward", &AutogradKernel<frn_det::FrnBackwardFunction, frn_det::FrnBackwardSignature>::call);
  m.impl("frn_centered", &AutogradKernel<frn_det::FrnCenteredFunction, frn_det::FrnCenteredSignature>::call);
  m.impl("frn_centered_backward",
         &AutogradKernel<frn_det::FrnCenteredBackwardFunction, frn_det::FrnCenteredBackwardSignature>::call);
}
