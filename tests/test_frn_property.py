"""Property test: the fused op equals the plain-PyTorch reference (forward and every gradient) over
random shapes (N 0-3, C 1-16, H and W 1-20), dtypes, layouts, with and without TLU and learned eps,
on CPU and, where a GPU is visible, on CUDA."""
import pytest
import torch

from frn_det.layers import ops
from frn_testing import assert_matches_reference, make_inputs

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.is_available(), reason=f"frn_det._C not built: {ops.load_error()}")

# (atol, rtol) against the float64 reference, per input dtype
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.float16: (3e-2, 2e-2),
       torch.bfloat16: (1e-1, 5e-2)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 3), c=st.integers(1, 16), h=st.integers(1, 20), w=st.integers(1, 20),
       dtype=st.sampled_from(list(TOL)), channels_last=st.booleans(), tlu=st.booleans(),
       learned_eps=st.booleans(), seed=st.integers(0, 2**16))
def test_op_equals_reference(device, n, c, h, w, dtype, channels_last, tlu, learned_eps, seed):
    args = make_inputs((n, c, h, w), dtype=dtype, tlu=tlu, learned_eps=learned_eps, channels_last=channels_last,
                       device=device, param_dtype=None if dtype == torch.float64 else torch.float32, seed=seed)
    atol, rtol = TOL[dtype]
    assert_matches_reference(*args, atol=atol, rtol=rtol, seed=seed + 1)
