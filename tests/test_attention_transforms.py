"""mlx_ext.scaled_dot_product_attention under MLX's transforms: the fused
backward (q, k, v, sinks) and jvp against finite differences of the float64
reference, vmap, compile, and the derivatives it refuses."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_ext

from . import reference as ref
from .test_attention import PER_ISA, problems, random_quantized_kv

sdpa = mlx_ext.scaled_dot_product_attention


def reference_loss(args, names, cotangent, kwargs):
    """sum(reference(...) * cotangent) with `names` taken from `args` (float64)."""
    call = dict(kwargs)
    call.update(zip(names, args))
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    return float(np.sum(ref.scaled_dot_product_attention(q, k, v, **call) * cotangent))


def check_directional_derivatives(grads, primals, names, cotangent, kwargs, rng, rtol):
    """<grad, u> against the central difference of the reference along u, for
    three random directions u of each argument (float64, so h can be small).
    Float32 noise is about 1e-5 per element, random in sign, times the size of
    the logits (the probabilities' rounding follows it)."""
    base = [ref.to_f64(p) for p in primals]
    call = dict(kwargs, **dict(zip(names, primals)))
    q, head_dim = ref.to_f64(call["q"]), call["q"].shape[-1]
    keys, _ = ref.attention_kv(call["k"], head_dim, call.get("group_size", 64), call.get("bits"))
    logits = 1.0 + call["scale"] * np.abs(q).max() * np.abs(keys).max() * np.sqrt(head_dim)
    for i, (g, name) in enumerate(zip(grads, names)):
        for _ in range(3):
            u = rng.normal(size=base[i].shape)
            h = 1e-6
            plus = [b + h * u if j == i else b for j, b in enumerate(base)]
            minus = [b - h * u if j == i else b for j, b in enumerate(base)]
            fd = (reference_loss(plus, names, cotangent, kwargs)
                  - reference_loss(minus, names, cotangent, kwargs)) / (2 * h)
            got = float(np.sum(ref.to_f64(g) * u))
            scale = float(np.sum(np.abs(ref.to_f64(g) * u)))
            tol = rtol * scale + 1e-5 * np.sqrt(u.size) * logits
            assert abs(got - fd) <= tol, f"d/d{name}: {got} vs finite difference {fd}"


@settings(PER_ISA, max_examples=12)
@given(problem=problems(quantized=False, dtypes=(mx.float32,)), seed=st.integers(0, 2**16))
def test_grad_matches_finite_differences(isa, problem, seed):
    q, k, v, kwargs = problem
    rng = np.random.default_rng(seed)
    cotangent = rng.normal(size=q.shape)
    names = ["q", "k", "v"] + (["sinks"] if kwargs["sinks"] is not None else [])
    primals = [q, k, v] + ([kwargs["sinks"]] if kwargs["sinks"] is not None else [])
    rest = {n: a for n, a in kwargs.items() if n not in names}

    def loss(*args):
        call = dict(rest, **dict(zip(names, args)))
        return (sdpa(call.pop("q"), call.pop("k"), call.pop("v"), **call) * mx.array(cotangent, dtype=mx.float32)).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(names))))(*primals)
    for g, p in zip(grads, primals):
        assert g.shape == p.shape and g.dtype == p.dtype
    check_directional_derivatives(grads, primals, names, cotangent, rest, rng, rtol=1e-3)


def test_grad_agrees_with_mlx_autodiff(isa):
    """Element by element against MLX's own attention differentiated by MLX."""
    rng = np.random.default_rng(0)
    q = mx.array(rng.normal(size=(2, 6, 70, 64)), dtype=mx.float32)
    k, v = (mx.array(rng.normal(size=(2, 2, 150, 64)), dtype=mx.float32) for _ in range(2))
    sinks = mx.array(rng.normal(size=6), dtype=mx.float32)
    g = mx.array(rng.normal(size=q.shape), dtype=mx.float32)

    def loss(fn):
        return lambda q, k, v, s: (fn(q, k, v, scale=0.125, mask="causal", sinks=s) * g).sum()

    ours = mx.grad(loss(sdpa), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    theirs = mx.grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4 * float(mx.abs(b).max()))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_grad_keeps_dtypes(dtype):
    rng = np.random.default_rng(1)
    q = mx.array(rng.normal(size=(1, 2, 4, 32)), dtype=dtype)
    k, v = (mx.array(rng.normal(size=(1, 1, 9, 32)), dtype=dtype) for _ in range(2))
    f = lambda q, k, v: sdpa(q, k, v, scale=0.2).astype(mx.float32).sum()
    grads = mx.grad(f, argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(lambda q, k, v: sdpa(q, k, v, scale=0.2).sum(), argnums=(0, 1, 2))(
        *(x.astype(mx.float32) for x in (q, k, v)))
    for g, w in zip(grads, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(ref.to_f64(g), ref.to_f64(w), atol=0.05 * float(mx.abs(w).max()) + 1e-3)


@settings(PER_ISA, max_examples=8)
@given(problem=problems(quantized=True, dtypes=(mx.float32,)), seed=st.integers(0, 2**16))
def test_quantized_grad_wrt_q_and_sinks(isa, problem, seed):
    q, k, v, kwargs = problem
    rng = np.random.default_rng(seed)
    cotangent = rng.normal(size=q.shape)
    # Dequantized keys reach |k| ~ 50: logits of order 1 keep the float32
    # gradient well conditioned enough for a finite-difference check.
    keys, _ = ref.attention_kv(k, q.shape[-1], kwargs["group_size"], kwargs["bits"])
    kwargs["scale"] = 1.0 / float(np.abs(keys).max() * np.sqrt(q.shape[-1]))
    sinks = kwargs.pop("sinks")
    if sinks is None:
        sinks = mx.array(rng.normal(size=q.shape[1]), dtype=mx.float32)

    def loss(q, sinks):
        return (sdpa(q, k, v, sinks=sinks, **kwargs) * mx.array(cotangent, dtype=mx.float32)).sum()

    grads = mx.grad(loss, argnums=(0, 1))(q, sinks)
    check_directional_derivatives(grads, [q, sinks], ["q", "sinks"], cotangent, dict(kwargs, k=k, v=v),
                                  rng, rtol=1e-3)


@pytest.mark.parametrize("part", [0, 1, 2])
@pytest.mark.parametrize("which", ["k", "v"])
def test_grad_wrt_quantized_kv_is_a_clear_error(which, part):
    rng = np.random.default_rng(2)
    q = mx.array(rng.normal(size=(1, 2, 3, 64)), dtype=mx.float32)
    kv = {n: random_quantized_kv(rng, (1, 1, 20, 64), 4, 64, mx.float32) for n in "kv"}

    def f(x):
        t = list(kv[which])
        t[part] = x
        args = dict(kv, **{which: tuple(t)})
        return sdpa(q, args["k"], args["v"], scale=0.1).sum()

    with pytest.raises(ValueError, match=r"^\[mlx_ext\.scaled_dot_product_attention\] derivatives with respect to quantized k and v"):
        mx.grad(f)(kv[which][part].astype(mx.float32) if part else kv[which][part])


def test_grad_wrt_mask_is_a_clear_error():
    q = k = v = mx.ones((1, 1, 4, 16))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.scaled_dot_product_attention\] derivatives with respect to mask"):
        mx.grad(lambda m: sdpa(q, k, v, scale=1.0, mask=m).sum())(mx.zeros((4, 4)))


@pytest.mark.parametrize("mask", [None, "causal", "additive"])
def test_jvp_matches_finite_differences(mask):
    rng = np.random.default_rng(3)
    q = mx.array(rng.normal(size=(2, 4, 6, 32)), dtype=mx.float32)
    k, v = (mx.array(rng.normal(size=(2, 2, 9, 32)), dtype=mx.float32) for _ in range(2))
    sinks = mx.array(rng.normal(size=4), dtype=mx.float32)
    if mask == "additive":
        mask = mx.array(rng.normal(size=(6, 9)), dtype=mx.float32)
    kwargs = dict(scale=0.3, mask=mask, window=5, kv_lengths=mx.array([9, 7], dtype=mx.int32))
    primals = [q, k, v, sinks]
    tangents = [mx.array(rng.normal(size=p.shape), dtype=mx.float32) for p in primals]
    f = lambda q, k, v, s: sdpa(q, k, v, sinks=s, **kwargs)
    (out,), (tangent,) = mx.jvp(f, primals, tangents)
    h = 1e-6
    at = lambda sign: ref.scaled_dot_product_attention(
        *(ref.to_f64(p) + sign * h * ref.to_f64(t) for p, t in zip(primals[:3], tangents[:3])),
        sinks=ref.to_f64(sinks) + sign * h * ref.to_f64(tangents[3]), **kwargs)
    np.testing.assert_allclose(ref.to_f64(tangent), (at(1) - at(-1)) / (2 * h), rtol=1e-3, atol=1e-4)


def test_vmap_matches_a_loop():
    rng = np.random.default_rng(4)
    qs = mx.array(rng.normal(size=(1, 4, 5, 32, 3)), dtype=mx.float32)  # mapped axis last
    ks = mx.array(rng.normal(size=(3, 1, 2, 8, 32)), dtype=mx.float32)  # mapped axis first
    v = mx.array(rng.normal(size=(1, 2, 8, 32)), dtype=mx.float32)  # not mapped
    mask = mx.array(rng.random((5, 8)) < 0.7)
    f = lambda q, k: sdpa(q, k, v, scale=0.2, mask=mask, kv_lengths=mx.array([7], dtype=mx.int32))
    out = mx.vmap(f, in_axes=(4, 0))(qs, ks)
    assert out.shape == (3, 1, 4, 5, 32)
    for n in range(3):
        np.testing.assert_allclose(np.array(out[n]), np.array(f(qs[..., n], ks[n])), rtol=1e-6, atol=1e-6)


def test_vmap_over_sinks_is_a_clear_error():
    q = k = v = mx.ones((1, 2, 4, 16))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.scaled_dot_product_attention\] vmap over sinks"):
        mx.vmap(lambda s: sdpa(q, k, v, scale=1.0, sinks=s))(mx.zeros((3, 2)))


def test_compile_forward_and_grad():
    rng = np.random.default_rng(5)
    q = mx.array(rng.normal(size=(1, 4, 7, 32)), dtype=mx.float32)
    k, v = (mx.array(rng.normal(size=(1, 2, 12, 32)), dtype=mx.float32) for _ in range(2))
    f = lambda q, k, v: (sdpa(q, k, v, scale=0.2, mask="causal", window=4) ** 2).sum()
    np.testing.assert_array_equal(np.array(mx.compile(f)(q, k, v)), np.array(f(q, k, v)))
    g = mx.grad(f, argnums=(0, 1, 2))
    for a, b in zip(mx.compile(g)(q, k, v), g(q, k, v)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)


def test_backward_peak_memory_stays_linear():
    """The gradient at a size where the L x S scores would be 21x the inputs."""
    shape = (1, 2, 2048, 32)
    q, k, v, g = (mx.random.normal(shape, key=mx.random.key(i)) for i in range(4))
    mx.eval(q, k, v, g)
    inputs = 3 * q.nbytes
    scores = shape[1] * shape[2] * shape[2] * 4
    grad = mx.grad(lambda q, k, v: (sdpa(q, k, v, scale=0.17, mask="causal") * g).sum(), argnums=(0, 1, 2))
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(q, k, v))
    peak = mx.get_peak_memory() - base
    print(f"backward: inputs {inputs} B, scores {scores} B, peak {peak} B")
    assert peak <= 4 * inputs
