"""benchmarks/op.py: the AMP setting (fp32 parameters, x in fp16/bf16, autocast) and the memory-floor
table, on the CPU; kernel time (CUDA graphs) is CUDA's and says so elsewhere."""
import pytest
import torch

from benchmarks import op as bench
from frn_det.layers import ops

SHAPE = [("tiny", (2, 32, 5, 7))]


def test_amp_keeps_fp32_parameters_and_gives_each_gradient_its_dtype(monkeypatch):
    module = bench.make_methods(32)["reference"]().train()  # fp32 parameters, as --amp leaves them
    x, grad_out = bench._inputs(SHAPE[0][1], "cpu", torch.bfloat16, False)
    captured, grad = [], torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a: captured.append([g.dtype for g in grad(*a)]))
    bench.make_closures(module, x, grad_out, amp=True)[1]()
    assert captured == [[torch.bfloat16, torch.float32, torch.float32, torch.float32]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_method_runs_under_amp(dtype):
    methods = ["reference", "BatchNorm2d+ReLU", "GroupNorm32+ReLU"] + (["op"] if ops.is_available() else [])
    rows = bench.run("cpu", dtype, SHAPE, 1, False, "min", methods=methods, amp=True)
    assert sorted(r[2] for r in rows) == sorted(methods)
    assert all(len(r) == 8 and r[3] > 0 and r[5] > 0 for r in rows), rows  # timed, not an error row


@pytest.mark.skipif(not ops.is_available(), reason="frn_det._C is not built")
def test_memory_floor_under_amp_and_its_table():
    rows = bench.memory_floor("cpu", torch.bfloat16, SHAPE, 1, False, "min", amp=True)
    assert [r[2] for r in rows] == ["forward", "backward", "forward+backward"]
    assert all(r[3] == "default" and r[4] > 0 and r[5] > 0 and r[6] > 0 for r in rows)
    table = bench.format_floor_table(rows, "cpu", torch.bfloat16, False, 1, "min", amp=True)
    assert "bfloat16 with fp32 parameters (AMP: autocast)" in table
    name, shape, kind, kernels, op_s, floor_s, fresh_s = rows[2]
    assert f"| {op_s / floor_s:.2f} | {100 * floor_s / op_s:.0f} |" in table


@pytest.mark.skipif(not ops.is_available(), reason="frn_det._C is not built")
def test_kernel_settings_are_timed_side_by_side_under_their_setting(monkeypatch):
    # Each kernel setting is its own row, and the op runs under it (checked from inside the op's call).
    seen = []
    real = torch.ops.frn_det.frn

    def spy(*args):
        current = torch.ops.frn_det._set_cuda_resident(False)
        torch.ops.frn_det._set_cuda_resident(current)
        seen.append((current, torch.ops.frn_det._cpu_isa()))
        return real(*args)

    monkeypatch.setattr(bench, "frn", lambda *a, impl: spy(*a)[0])
    kernels = ("default", "resident", "baseline")
    rows = bench.run("cpu", torch.float32, SHAPE, 1, False, "min", methods=["op", "BatchNorm2d+ReLU"], kernels=kernels)
    assert [r[2] for r in rows] == ["op", "op (resident)", "op (baseline)", "BatchNorm2d+ReLU"]
    assert (True, torch.ops.frn_det._cpu_isa()) in seen and (False, "baseline") in seen
    floor = bench.memory_floor("cpu", torch.float32, SHAPE, 1, False, "min", kernels=kernels)
    assert [(r[2], r[3]) for r in floor][:3] == [("forward", "default"), ("forward", "resident"), ("forward", "baseline")]


def test_amp_needs_a_half_dtype_and_kernel_time_needs_cuda():
    with pytest.raises(ValueError, match="float16 or bfloat16, not torch.float32"):
        bench.run("cpu", torch.float32, SHAPE, 1, False, "min", amp=True)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        bench.memory_floor("cpu", torch.float64, SHAPE, 1, False, "min", amp=True)
    with pytest.raises(ValueError, match="CUDA graph"):
        bench.make_timer(lambda: None, "cpu", kernel_time=True)


def test_the_centred_methods_compute_the_same_function():
    # centred op, centred reference and InstanceNorm2d + TLU given the same parameters agree, so
    # their timings compare one computation.
    methods = bench.make_methods(32)
    names = ["centred reference", "InstanceNorm2d+TLU"] + (["centred op"] if ops.is_available() else [])
    x = torch.randn(2, 32, 5, 7) * 3 + 1
    first = methods[names[0]]()
    outs = []
    for name in names:
        module = methods[name]()
        with torch.no_grad():
            params = list(module.parameters())  # weight, bias, tau in both kinds of module
            for p, q in zip(params, first.parameters()):
                p.copy_(q)
        outs.append(module(x))
    for name, out in zip(names[1:], outs[1:]):
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_ratios_are_to_the_named_baseline():
    methods = ["centred reference", "InstanceNorm2d+TLU"] + (["centred op"] if ops.is_available() else [])
    rows = bench.run("cpu", torch.float32, SHAPE, 2, False, "min", methods=methods[1:], baseline=methods[0])
    by_name = {r[2]: r for r in rows}
    assert sorted(by_name) == sorted(methods)  # the baseline is timed although --methods leaves it out
    base = by_name[methods[0]]
    assert base[7] == "1.00 / 1.00"
    for row in rows:
        assert row[7] == f"{row[3] / base[3]:.2f} / {row[5] / base[5]:.2f}"


@pytest.mark.skipif(not ops.is_available(), reason="frn_det._C is not built")
def test_memory_floor_of_the_centred_op():
    assert bench._op_pair(True) == (torch.ops.frn_det.frn_centered.default,
                                    torch.ops.frn_det.frn_centered_backward.default)
    rows = bench.memory_floor("cpu", torch.float32, SHAPE, 1, False, "min", centered=True)
    assert [r[2] for r in rows] == ["forward", "backward", "forward+backward"]
    assert all(r[4] > 0 and r[5] > 0 for r in rows)
    table = bench.format_floor_table(rows, "cpu", torch.float32, False, 1, "min", centered=True)
    assert table.startswith("### Centred FRN op (frn_centered) against its memory floor")
