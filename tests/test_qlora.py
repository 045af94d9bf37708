"""QLoRA through mlx_ext: mlx-lm's LoRA layers (mlx_lm.tuner) on a patched,
quantized base model train exactly as on MLX's layers. The frozen base needs
the gradient with respect to x through the quantized matmul; the adapters'
gradients flow through it."""

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

import mlx_ext

from .lm_acceptance import build_quantized
from .test_lm_patch import LLAMA

pytest.importorskip("mlx_lm")

STEPS = 5


def lora_losses(patched: bool) -> list[float]:
    """Per-step losses of STEPS Adam steps of mlx-lm's LoRA on a fixed batch."""
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = build_quantized(LLAMA)
    if patched:
        report = mlx_ext.patch(model)
        assert report.replaced["QuantizedLinear"] == 15, report
    model.freeze()
    mx.random.seed(1)  # the adapters' initial values, the same in both runs
    linear_to_lora_layers(model, 2, {"rank": 8, "scale": 10.0, "dropout": 0.0})
    assert any("lora_a" in name for name, _ in tree_flatten(model.trainable_parameters()))

    batch = mx.array(np.random.default_rng(0).integers(0, LLAMA["vocab_size"], (2, 17)))
    lengths = mx.array([[0, 16], [0, 16]])
    optimizer = optim.Adam(learning_rate=1e-2)
    loss_and_grad = nn.value_and_grad(model, lambda b, l: default_loss(model, b, l)[0])
    losses = []
    for _ in range(STEPS):
        loss, grads = loss_and_grad(batch, lengths)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        losses.append(loss.item())
    return losses


def test_lora_on_a_patched_model_trains_like_mlx():
    theirs = lora_losses(patched=False)
    ours = lora_losses(patched=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)
    assert ours[-1] < 0.9 * ours[0], ours
