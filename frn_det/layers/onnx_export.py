"""ONNX export of the fused op ``torch.ops.frn_det.frn`` as standard ONNX operators (no custom domain),
so that FRN models export and run in any ONNX runtime, as BN models do.

- TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, detectron2's export_model
  and TracingAdapter): the symbolic below is registered when ``frn_det.layers`` is imported.
- torch.export-based exporter (``dynamo=True``): pass
  ``custom_translation_table=frn_det.layers.onnx_export.translation_table()``.

Both emit the reference's arithmetic: nu2 = GlobalAveragePool(x * x); rstd = 1 / sqrt(nu2 + eps
(+ |eps_l|)); y = x * rstd * gamma + beta; TLU as Where(y < tau, tau, y) (NaN kept, as the op). The
second output is rstd reshaped to (N, C), as the op returns it.
"""
import torch

# The lowest opset with every operator used (Where, Less: 9).
MIN_OPSET = 9


def _frn_symbolic(g, x, weight, bias, tau, eps, eps_l):
    from torch.onnx import symbolic_helper

    per_channel = g.op("Constant", value_t=torch.tensor([1, -1, 1, 1], dtype=torch.int64))
    eps_eff = g.op("Constant", value_t=torch.tensor(symbolic_helper._maybe_get_const(eps, "f"), dtype=torch.float32))
    if not symbolic_helper._is_none(eps_l):
        scalar = g.op("Constant", value_t=torch.tensor([], dtype=torch.int64))
        eps_eff = g.op("Add", eps_eff, g.op("Abs", g.op("Reshape", eps_l, scalar)))
    nu2 = g.op("GlobalAveragePool", g.op("Mul", x, x))
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", nu2, eps_eff)))
    y = g.op("Add", g.op("Mul", g.op("Mul", x, rstd), g.op("Reshape", weight, per_channel)),
             g.op("Reshape", bias, per_channel))
    if not symbolic_helper._is_none(tau):
        t = g.op("Reshape", tau, per_channel)
        y = g.op("Where", g.op("Less", y, t), t, y)
    return y, g.op("Flatten", rstd, axis_i=1)


def register_symbolic():
    """Register the TorchScript-based exporter's symbolic for frn_det::frn (idempotent)."""
    torch.onnx.register_custom_op_symbolic("frn_det::frn", _frn_symbolic, MIN_OPSET)


def translation_table():
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: frn_det::frn in
    ONNX Script, the same operators as the symbolic (needs the onnxscript package)."""
    from onnxscript import opset18 as op

    def frn(x, weight, bias, tau=None, eps: float = 1e-6, eps_l=None):
        per_channel = op.Constant(value_ints=[1, -1, 1, 1])
        eps_eff = op.CastLike(op.Constant(value_float=eps), x)
        if eps_l is not None:
            eps_eff = op.Add(eps_eff, op.Abs(op.Reshape(eps_l, op.Constant(value_ints=[]))))
        nu2 = op.GlobalAveragePool(op.Mul(x, x))
        rstd = op.Reciprocal(op.Sqrt(op.Add(nu2, eps_eff)))
        y = op.Add(op.Mul(op.Mul(x, rstd), op.Reshape(weight, per_channel)), op.Reshape(bias, per_channel))
        if tau is not None:
            t = op.Reshape(tau, per_channel)
            y = op.Where(op.Less(y, t), t, y)
        return y, op.Flatten(rstd, axis=1)

    return {torch.ops.frn_det.frn.default: frn}
