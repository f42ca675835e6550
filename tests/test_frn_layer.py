"""FilterResponseNorm2d and TLU modules: parameters, state_dict, both implementations, tie rule."""
import pytest
import torch
from frn_testing import impl_params, paper_frn

import frn_det
from frn_det.layers import TLU, FilterResponseNorm2d

IMPLS = impl_params()


def test_exported_from_package():
    assert frn_det.FilterResponseNorm2d is FilterResponseNorm2d and frn_det.TLU is TLU
    assert frn_det.layers.FilterResponseNorm2d is FilterResponseNorm2d


def test_parameter_init_values():
    m = FilterResponseNorm2d(6)
    assert torch.equal(m.weight, torch.ones(6)) and torch.equal(m.bias, torch.zeros(6))
    assert torch.equal(m.tau, torch.zeros(6))
    assert m.eps == 1e-6 and m.eps_l is None


def test_tlu_false_has_no_tau():
    m = FilterResponseNorm2d(4, tlu=False)
    assert m.tau is None
    assert "tau" not in dict(m.named_parameters())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x).double(), paper_frn(x, m.weight, m.bias, None, m.eps))
    assert (m(x) < 0).any()  # no threshold applied


def test_learned_eps_parameter():
    m = FilterResponseNorm2d(4, learned_eps=True)
    assert isinstance(m.eps_l, torch.nn.Parameter) and m.eps_l.shape == ()
    assert m.eps_l.item() == pytest.approx(1e-4)


def test_reset_parameters_restores_init():
    m = FilterResponseNorm2d(3, learned_eps=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.5)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(3)) and torch.equal(m.bias, torch.zeros(3))
    assert torch.equal(m.tau, torch.zeros(3)) and m.eps_l.item() == pytest.approx(1e-4)


def test_state_dict_keys():
    assert list(FilterResponseNorm2d(3, learned_eps=True).state_dict()) == ["weight", "bias", "tau", "eps_l"]
    assert list(FilterResponseNorm2d(3).state_dict()) == ["weight", "bias", "tau"]
    assert list(FilterResponseNorm2d(3, tlu=False).state_dict()) == ["weight", "bias"]
    assert list(TLU(3).state_dict()) == ["tau"]


def test_factory_kwargs():
    m = FilterResponseNorm2d(3, learned_eps=True, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_forward_backward_is_the_papers_formula(impl, channels_last):
    torch.manual_seed(0)
    m = FilterResponseNorm2d(5, learned_eps=True, impl=impl).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
        m.tau.uniform_(-0.3, 0.3)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    xr = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in m.parameters()]
    ref = paper_frn(xr, params[0], params[1], params[2], m.eps, params[3])
    ref_grads = torch.autograd.grad(ref, [xr, *params], g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_tlu_module_forward_and_tie_rule():
    m = TLU(2)
    with torch.no_grad():
        m.tau.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[[[0.5, 0.2, 1.0]], [[-1.0, -2.0, 0.0]]]], requires_grad=True)
    out = m(x)
    torch.testing.assert_close(out.detach(), torch.tensor([[[[0.5, 0.5, 1.0]], [[-1.0, -1.0, 0.0]]]]))
    out.backward(torch.ones_like(out))
    # Ties (x == tau) pass the gradient to x, not to tau.
    torch.testing.assert_close(x.grad, torch.tensor([[[[1.0, 0.0, 1.0]], [[1.0, 0.0, 1.0]]]]))
    torch.testing.assert_close(m.tau.grad, torch.tensor([1.0, 1.0]))


def test_tlu_module_rejects_wrong_channels():
    with pytest.raises(ValueError, match="TLU"):
        TLU(3)(torch.randn(2, 4, 5, 5))


def test_bad_num_features_and_impl():
    with pytest.raises(ValueError):
        FilterResponseNorm2d(0)
    with pytest.raises(ValueError, match="unknown FRN implementation"):
        FilterResponseNorm2d(3, impl="cudnn")


def test_add_tlu_and_learned_eps_in_place_keep_device_dtype_and_equal_a_built_layer():
    m = FilterResponseNorm2d(3, tlu=False, dtype=torch.float64)
    assert m.add_tlu().add_learned_eps() is m
    assert m.tau.dtype == m.eps_l.dtype == torch.float64
    assert list(m.state_dict()) == ["weight", "bias", "tau", "eps_l"]
    tau, eps_l = m.tau, m.eps_l
    m.add_tlu().add_learned_eps()  # idempotent
    assert m.tau is tau and m.eps_l is eps_l
    built = FilterResponseNorm2d(3, learned_eps=True, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), built(x), atol=0, rtol=0)
    meta = FilterResponseNorm2d(3, tlu=False, device="meta").add_tlu().add_learned_eps()
    assert meta.tau.device.type == "meta" and meta.eps_l.device.type == "meta"
    frozen = FilterResponseNorm2d(3, tlu=False).requires_grad_(False).add_tlu().add_learned_eps()
    assert not frozen.tau.requires_grad and not frozen.eps_l.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates_through_the_tlu_forward_and_backward(impl):
    """max(NaN, tau) is NaN (as torch.maximum and ReLU), so a diverged layer is not hidden behind tau;
    the gradient at a NaN position goes to y, not tau."""
    tlu = TLU(2)
    x = torch.tensor([[[[float("nan"), -1.0]], [[0.0, 2.0]]]], requires_grad=True)
    out = tlu(x)
    assert torch.isnan(out[0, 0, 0, 0]) and out[0, 0, 0, 1] == 0.0
    out.backward(torch.ones_like(out))
    assert x.grad[0, 0, 0, 0] == 1.0 and tlu.tau.grad.tolist() == [1.0, 0.0]
    layer = FilterResponseNorm2d(2, impl=impl)
    y = torch.randn(2, 2, 3, 3)
    y[1, 1, 2, 2] = float("nan")
    out = layer(y)
    assert torch.isnan(out[1, 1]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 0]).all()
