"""Bad input raises ValueError / TypeError naming the op or container, before
any kernel runs: malformed patterns where they arrive (the containers),
shapes, dtypes and streams at the op."""

import numpy as np
import pytest

import mlx.core as mx
import mlx_ext
from mlx_ext import sparse

F32 = np.float32


def csr_args(**change):
    """A valid 2 x 4 CSR in SciPy's order, with some arguments replaced."""
    args = dict(data=np.ones(3, F32), indices=np.array([0, 3, 1]), indptr=np.array([0, 2, 3]),
                shape=(2, 4))
    args.update(change)
    return args


@pytest.mark.parametrize("change, match", [
    (dict(indices=np.array([0, 4, 1])), r"indices has 4, outside \[0, 4\)"),
    (dict(indices=np.array([0, -1, 1])), r"outside \[0, 4\)"),
    (dict(indptr=np.array([0, 3, 2])), "non-decreasing"),
    (dict(indptr=np.array([0, 2, 2])), "end at 3"),
    (dict(indptr=np.array([1, 2, 3])), "start at 0"),
    (dict(indptr=np.array([0, 3])), r"shape \(3,\)"),
    (dict(indices=np.array([3, 0, 1])), "sorted and without duplicates"),
    (dict(indices=np.array([3, 3, 1])), "sorted and without duplicates"),
    (dict(indices=np.array([0, 3])), "shape of data"),
    (dict(shape=(2, 0)), "positive"),
])
def test_csr_structure(change, match):
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.CSR\] .*" + match):
        sparse.CSR(**csr_args(**change))


def test_csr_dtypes():
    with pytest.raises(TypeError, match=r"^\[mlx_ext\.sparse\.CSR\] data must be float32"):
        sparse.CSR(**csr_args(data=mx.ones(3, mx.int32)))
    with pytest.raises(TypeError, match=r"^\[mlx_ext\.sparse\.CSR\] indices must hold integers"):
        sparse.CSR(**csr_args(indices=np.array([0.0, 3.0, 1.0])))


def test_bsr_structure():
    data = np.ones((2, 2, 2), F32)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.BSR\] blocks of shape \(2, 2\) do not divide"):
        sparse.BSR(data, [0, 1], [0, 1, 2], (4, 5))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.BSR\] indices has 2, outside \[0, 2\)"):
        sparse.BSR(data, [0, 2], [0, 1, 2], (4, 4))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.BSR\] indices must be sorted"):
        sparse.BSR(data, [1, 1], [0, 2, 2], (4, 4))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.BSR\] block \(3, 3\) does not divide"):
        sparse.BSR.from_dense(mx.ones((4, 4)), block=3)


def test_bitmask_structure():
    mask = np.zeros((2, 40), bool)
    mask[0, 3] = mask[1, 39] = True
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.Bitmask\] data holds 3 values but the mask marks 2"):
        sparse.Bitmask(np.ones(3, F32), mask, (2, 40))
    words = np.zeros((2, 2), np.uint32)
    words[0, 1] = 1 << 9  # column 41 of a 40-column matrix
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.Bitmask\] mask has bits set past column K=40"):
        sparse.Bitmask(np.ones(1, F32), words, (2, 40))
    with pytest.raises(TypeError, match=r"^\[mlx_ext\.sparse\.Bitmask\] mask must be bool or uint32"):
        sparse.Bitmask(np.ones(1, F32), words.astype(np.int64), (2, 40))


def test_nm_structure():
    data = np.ones((1, 4), F32)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.NM\] codes must lie in \[0, 4\), got 4"):
        sparse.NM(data, [[0, 4, 1, 2]], (1, 8))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.NM\] codes must be strictly increasing"):
        sparse.NM(data, [[1, 1, 0, 2]], (1, 8))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.NM\] K=6 is not a multiple of m=4"):
        sparse.NM(data, [[0, 1, 0, 2]], (1, 6))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.NM\] n:m=4:4 is not supported"):
        sparse.NM(data, [[0, 1, 2, 3]], (1, 4), n=4, m=4)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.NM\] bits=3 is not supported"):
        sparse.NM.from_dense(mx.ones((2, 256)), bits=3)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.NM\] mask keeps more than 2 of some group"):
        sparse.NM.from_dense(mx.ones((1, 8)), mask=np.ones((1, 8), bool))


@pytest.fixture
def ws():
    return sparse.CSR(**csr_args())


def test_op_shape_mismatch(ws):
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] x has inner dimension 5"):
        mlx_ext.sparse_matmul(mx.ones((3, 5)), ws)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] x must have at least one dimension"):
        mlx_ext.sparse_matmul(mx.array(1.0), ws)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] bias must have shape \(2,\)"):
        mlx_ext.sparse_matmul(mx.ones((3, 4)), ws, mx.ones(4))


def test_op_dtypes(ws):
    with pytest.raises(TypeError, match=r"^\[mlx_ext\.sparse_matmul\] x must be float32"):
        mlx_ext.sparse_matmul(mx.ones((3, 4), mx.int32), ws)
    with pytest.raises(TypeError, match=r"^\[mlx_ext\.sparse_matmul\] bias must be float32"):
        mlx_ext.sparse_matmul(mx.ones((3, 4)), ws, mx.ones(2, mx.int32))
    with pytest.raises(TypeError, match=r"^\[mlx_ext\.sparse_matmul\] ws must be a container"):
        mlx_ext.sparse_matmul(mx.ones((3, 4)), mx.ones((2, 4)))


def test_op_checks_shapes_and_dtypes_of_plain_dicts(ws):
    """The plain dict mx.compile hands over is checked by what shapes and dtypes can say."""
    d = dict(ws)
    d["indptr"] = mx.array([0, 2, 3, 3], dtype=mx.int32)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] indptr must have shape \(3\)"):
        mlx_ext.sparse_matmul(mx.ones((1, 4)), d)
    d["indptr"] = mx.array([0, 2, 3], dtype=mx.int64)
    with pytest.raises(TypeError, match=r"^\[mlx_ext\.sparse_matmul\] indptr must be int32"):
        mlx_ext.sparse_matmul(mx.ones((1, 4)), d)


def test_raw_op_block_and_bits():
    data = mx.ones((1, 2, 2))
    idx, ptr = mx.array([0], dtype=mx.int32), mx.array([0, 1, 1], dtype=mx.int32)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] block \(2, 3\) does not divide"):
        mlx_ext._ext.sparse_matmul_arrays(mx.ones((1, 4)), "bsr", [data, idx, ptr], (4, 4), block=(2, 3))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] format='coo' is not one of"):
        mlx_ext._ext.sparse_matmul_arrays(mx.ones((1, 4)), "coo", [data, idx, ptr], (4, 4))
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] bits=4: only the N:M format"):
        mlx_ext._ext.sparse_matmul_arrays(mx.ones((1, 4)), "bsr", [data, idx, ptr], (4, 4),
                                          block=(2, 2), bits=4)


def test_gpu_stream_refused(ws):
    if not mx.is_available(mx.gpu):
        pytest.skip("no GPU backend: MLX itself refuses GPU streams")
    if mlx_ext.gpu_kernels()["sparse_matmul"]:
        pytest.skip("this build has GPU kernels for sparse_matmul")
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse_matmul\] stream=.*GPU stream"):
        mlx_ext.sparse_matmul(mx.ones((1, 4)), ws, stream=mx.gpu)


def test_value_gradient_of_quantized_nm_refused():
    ws = sparse.NM.from_dense(mx.ones((2, 256)), bits=4, group_size=64)

    def loss(w_q):
        ws["w_q"] = w_q
        return mlx_ext.sparse_matmul(mx.ones((1, 256)), ws).sum()

    with mx.stream(mx.cpu), pytest.raises(  # a GPU stream is refused before any gradient
            ValueError, match=r"^\[mlx_ext\.sparse_matmul\] gradients with respect to"):
        mx.grad(loss)(ws["w_q"])


def test_pattern_replaced_after_construction_is_validated_again(ws):
    """load_weights / update / item assignment replace arrays past the
    constructor: the next product validates the pattern again."""
    ws["indices"] = mx.array([0, 4, 1], dtype=mx.uint16)  # same shape and dtype, column 4 of 4
    with mx.stream(mx.cpu):  # the product needs CPU kernels (a GPU stream is refused)
        with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparse\.CSR\] indices has 4, outside"):
            mlx_ext.sparse_matmul(mx.ones((1, 4)), ws)
        ws["indices"] = mx.array([0, 3, 1], dtype=mx.uint16)
        np.testing.assert_array_equal(np.array(mlx_ext.sparse_matmul(mx.ones((1, 4)), ws)), [[2.0, 1.0]])


@pytest.mark.parametrize("make, key, bad, match", [
    (lambda: sparse.Bitmask.from_dense(mx.ones((2, 40))), "row_ptr",
     mx.array([0, 41, 80], dtype=mx.int32), "row_ptr does not count"),
    (lambda: sparse.BSR.from_dense(mx.ones((4, 4)), block=2), "indices",
     mx.array([0, 2, 0, 1], dtype=mx.int32), r"indices has 2, outside \[0, 2\)"),
    (lambda: sparse.NM.from_dense(mx.ones((1, 8)), 4, 8), "codes",
     mx.array([[0x98 | (0xA << 8) | (0xB << 12)]], dtype=mx.uint32), r"codes must lie in \[0, 8\)"),
])
def test_update_with_a_bad_pattern_is_refused(make, key, bad, match):
    ws = make()
    ws.update({key: bad})
    with pytest.raises(ValueError, match=match):
        mlx_ext.sparse_matmul(mx.ones((1, ws.shape[1])), ws)
