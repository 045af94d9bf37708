"""The containers of mlx_ext.sparse: round trips, sizes, serialisation,
SciPy, and the pruning rules."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_ext import sparse

from . import reference as ref

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


@settings(max_examples=25)
@given(n=st.integers(1, 4), k=st.integers(1, 5), density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_round_trips(n, k, density, dtype, seed):
    rng = np.random.default_rng(seed)
    rows, cols = 8 * n, 8 * k
    w = mx.array(rng.standard_normal((rows, cols)), dtype=dtype)
    mask = rng.random((rows, cols)) < density
    masked = np.where(mask, ref.to_f64(w), 0.0)
    for cls in (sparse.CSR, sparse.Bitmask):
        ws = cls.from_dense(w, mask=mask)
        assert ws.to_dense().dtype == dtype
        np.testing.assert_array_equal(ref.to_f64(ws.to_dense()), masked)
        np.testing.assert_array_equal(ref.sparse_to_dense(ws), masked)
        assert ws.nnz == mask.sum()
        assert ws.density == pytest.approx(mask.mean())
    block_mask = rng.random((n, k)) < density
    ws = sparse.BSR.from_dense(w, block=8, mask=block_mask)
    expected = np.where(np.kron(block_mask, np.ones((8, 8), bool)), ref.to_f64(w), 0.0)
    np.testing.assert_array_equal(ref.to_f64(ws.to_dense()), expected)
    np.testing.assert_array_equal(ref.sparse_to_dense(ws), expected)
    for nm in [(2, 4), (4, 8), (1, 4)]:
        ws = sparse.NM.from_dense(w, *nm)
        keep = sparse.prune(w, pattern=f"{nm[0]}:{nm[1]}")
        np.testing.assert_array_equal(ref.to_f64(ws.to_dense()), np.where(keep, ref.to_f64(w), 0.0))
        np.testing.assert_array_equal(ref.sparse_to_dense(ws), np.where(keep, ref.to_f64(w), 0.0))


def test_nm_mask_with_fewer_kept_stores_zeros():
    w = mx.arange(16, dtype=mx.float32).reshape(2, 8) + 1
    mask = np.zeros((2, 8), bool)
    mask[0, [1, 3, 4]] = True  # group 0 full (2 kept), group 1 one kept, row 1 none
    ws = sparse.NM.from_dense(w, 2, 4, mask=mask)
    np.testing.assert_array_equal(np.array(ws.to_dense()), np.where(mask, np.array(w), 0))


def test_quantized_nm_to_dense_is_the_dequantized_values():
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((4, 256)), dtype=mx.float16)
    ws = sparse.NM.from_dense(w, 2, 4, bits=8, group_size=64)
    dense = ref.to_f64(ws.to_dense())
    keep = sparse.prune(w, pattern="2:4")
    assert np.all(dense[~keep] == 0)
    np.testing.assert_allclose(dense[keep], ref.to_f64(w)[keep], atol=0.05)
    # mx.dequantize rounds s * q and its sum with b to float16.
    np.testing.assert_allclose(ref.sparse_to_dense(ws), dense, atol=1e-2)


def test_sizes_and_index_width():
    w = mx.ones((64, 128), mx.float16)
    csr = sparse.CSR.from_dense(w, density=0.5)
    assert csr["indices"].dtype == mx.uint16
    assert csr.nnz == 64 * 64 and csr.density == 0.5
    assert csr.nbytes == 64 * 64 * (2 + 2) + 65 * 4
    bm = sparse.Bitmask.from_dense(w, density=0.5)
    assert bm.nbytes == 64 * 64 * 2 + 64 * 4 * 4 + 65 * 4
    nm = sparse.NM.from_dense(w, 2, 4)
    assert nm.nbytes == 64 * 64 * 2 + 64 * 4 * 4  # 2 bits per kept value
    bsr = sparse.BSR.from_dense(w, block=16, density=0.25)
    assert bsr.nnz == 64 * 128 // 4


@pytest.mark.parametrize("make", [
    lambda w: sparse.CSR.from_dense(w, density=0.3),
    lambda w: sparse.Bitmask.from_dense(w, density=0.5),
    lambda w: sparse.BSR.from_dense(w, block=16, density=0.5),
    lambda w: sparse.NM.from_dense(w, 2, 4),
    lambda w: sparse.NM.from_dense(w, 4, 8, bits=4, group_size=32),
])
def test_save_load_and_tree(tmp_path, make):
    w = mx.array(np.random.default_rng(1).standard_normal((32, 128)), dtype=mx.bfloat16)
    ws = make(w)
    ws.save(str(tmp_path / "w.safetensors"))
    back = sparse.load(str(tmp_path / "w.safetensors"))
    assert type(back) is type(ws) and back["_layout"] == ws["_layout"]
    np.testing.assert_array_equal(ref.to_f64(back.to_dense()), ref.to_f64(ws.to_dense()))
    arrays = dict((k, v) for k, v in tree_flatten(ws) if isinstance(v, mx.array))
    assert set(arrays) == {k for k, v in ws.items() if isinstance(v, mx.array)}
    # Only the values train; the pattern is frozen.
    trainable = {k for k, _ in tree_flatten(ws.trainable_parameters())}
    assert trainable == ({"data"} if "data" in ws else set())


def test_from_scipy_sorts_and_sums_duplicates():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    rows, cols = np.array([0, 0, 0, 2]), np.array([3, 1, 3, 0])
    m = scipy_sparse.coo_matrix((np.array([1.0, 2.0, 4.0, 8.0], np.float32), (rows, cols)), shape=(3, 5))
    ws = sparse.CSR.from_scipy(m)
    np.testing.assert_array_equal(np.array(ws.to_dense()), m.toarray())
    assert ws.nnz == 3


# --- pruning ---------------------------------------------------------------

@settings(max_examples=25)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8)]),
       seed=st.integers(0, 2**16))
def test_prune_n_of_m_is_exact(rows, groups, nm, seed):
    n, m = nm
    w = np.random.default_rng(seed).standard_normal((rows, groups * m)).astype(np.float32)
    mask = sparse.prune(mx.array(w), pattern=f"{n}:{m}")
    counts = mask.reshape(rows, groups, m).sum(axis=-1)
    assert np.all(counts == n)
    # The kept are the largest of each group.
    g = np.abs(w).reshape(rows, groups, m)
    kept_min = np.where(mask.reshape(g.shape), g, np.inf).min(axis=-1)
    dropped_max = np.where(mask.reshape(g.shape), -np.inf, g).max(axis=-1)
    assert np.all(kept_min >= dropped_max)


@settings(max_examples=25)
@given(rows=st.integers(1, 6), k=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_prune_density_within_one_element_per_row(rows, k, density, seed):
    w = np.random.default_rng(seed).standard_normal((rows, k))
    mask = sparse.prune(w, density=density)
    assert np.all(np.abs(mask.sum(axis=1) - density * k) <= 1)
    a = np.abs(w)
    assert np.all(np.where(mask, a, np.inf).min(axis=1) >= np.where(mask, -np.inf, a).max(axis=1))


def test_wanda_orders_by_weight_times_input_norm():
    w = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = np.array([10.0, 1.0, 1.0, 0.1])  # column 0 matters most, column 3 least
    mask = sparse.prune(w, density=0.5, method="wanda", activation_norms=norms)
    np.testing.assert_array_equal(mask, [[True, False, True, False], [True, True, False, False]])
    magnitude = sparse.prune(w, density=0.5)
    np.testing.assert_array_equal(magnitude, [[False, False, True, True], [True, True, False, False]])
    nm = sparse.prune(w, pattern="2:4", method="wanda", activation_norms=norms)
    np.testing.assert_array_equal(nm, mask)


def test_prune_arguments():
    w = np.ones((2, 8))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.prune\] pass exactly one"):
        sparse.prune(w)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.prune\] method='wanda' needs"):
        sparse.prune(w, density=0.5, method="wanda")
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.prune\] activation_norms must have shape"):
        sparse.prune(w, density=0.5, method="wanda", activation_norms=np.ones(3))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.prune\] pattern '2:3' needs"):
        sparse.prune(w, pattern="2:3")
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.prune\] density must lie in"):
        sparse.prune(w, density=1.5)
