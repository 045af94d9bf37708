"""mlx_ext.nn.QuantizedSwitchLinear and mlx_ext.patch on mlx-lm's SwitchGLU:
the same outputs as mlx-lm's layer (unsorted and sorted routing, per-expert
bias), the same arrays, the gate/up/SwiGLU fused where there is no bias, and
unpatch restoring mlx-lm's exact types."""

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx_ext

switch_layers = pytest.importorskip("mlx_lm.models.switch_layers")


def quantized_switch_glu(bias):
    mx.random.seed(0)
    glu = switch_layers.SwitchGLU(128, 64, 8, bias=bias)
    if bias:  # mlx-lm initialises them to zero: make them matter
        for proj in (glu.gate_proj, glu.up_proj, glu.down_proj):
            proj.bias = mx.random.normal(proj.bias.shape) * 0.1
    nn.quantize(glu, group_size=64, bits=4, class_predicate=lambda _p, m: hasattr(m, "to_quantized"))
    mx.eval(glu.parameters())
    return glu


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [3, 40])  # 40 x top-2 >= 64 pairs: SwitchGLU sorts them
def test_patched_switch_glu_matches_mlx_lm(bias, tokens):
    glu = quantized_switch_glu(bias)
    x = mx.random.normal((1, tokens, 128), key=mx.random.key(1))
    indices = mx.random.randint(0, 8, (1, tokens, 2), key=mx.random.key(2))
    want = glu(x, indices)
    weight = glu.gate_proj.weight

    report = mlx_ext.patch(glu)
    assert report.replaced["QuantizedSwitchLinear"] == 3 and not report.left
    assert type(glu.up_proj) is mlx_ext.nn.QuantizedSwitchLinear
    # Gate, up and SwiGLU fused into one gather_quantized_swiglu, where no bias is in the way.
    assert report.fused == ({} if bias else {"SwitchGLU": 1})
    assert type(glu) is (switch_layers.SwitchGLU if bias else mlx_ext.nn.SwitchGLU)
    assert isinstance(glu, switch_layers.SwitchGLU)
    assert glu.gate_proj.weight is weight  # the same arrays, not copies
    got = glu(x, indices)
    scale = float(mx.abs(want).max())
    assert float(mx.abs(got - want).max()) <= 1e-5 * scale

    back = mlx_ext.unpatch(glu)
    assert back.fused == report.fused and type(glu) is switch_layers.SwitchGLU
    assert type(glu.down_proj) is switch_layers.QuantizedSwitchLinear
    np.testing.assert_array_equal(np.array(glu(x, indices)), np.array(want))
