import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sparsetrain.nm import check_nm, is_nm, kept_magnitude, nm_mask, nm_masks, pack_mask, select_nm_layers, unpack_mask
from sparsetrain.nm import masks as masks_mod
from sparsetrain.selection import select_topk_rows
from tests.harness import run_triton_interpreted

PATTERNS = [(1, 2), (1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8), (7, 8), (5, 32)]
SHAPES = [(8, 32), (3, 64), (4, 2, 4, 4), (6, 32, 1), (2, 1, 2, 4, 4)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _groups(x, m):
    return x.reshape(-1, m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_exactly_n_per_group_and_largest_kept(n, m, shape, dtype):
    g = torch.Generator().manual_seed(hash((n, m, shape)) % 2**31)
    w = torch.randn(shape, generator=g).to(dtype)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    kept = _groups(mask, m)
    assert (kept.sum(-1) == n).all()
    a = _groups(w.abs().float(), m)
    min_kept = torch.where(kept, a, torch.inf).min(-1).values
    max_dropped = torch.where(kept, -torch.inf, a).max(-1).values
    assert (min_kept >= max_dropped).all()
    assert is_nm(torch.where(mask, w, 0), n, m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (3, 16)])
def test_matches_topk_on_distinct_values(n, m):
    w = torch.randn(16, 64, dtype=torch.float64)
    ref = torch.zeros(w.numel() // m, m, dtype=torch.bool)
    ref.scatter_(-1, w.abs().reshape(-1, m).topk(n, -1).indices, True)
    assert torch.equal(nm_mask(w, n, m), ref.reshape(w.shape))


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 8), (2, 16)])
def test_pairwise_and_sort_paths_agree_with_ties(n, m):
    w = torch.randint(-2, 3, (32, 64)).float()  # many ties, including zeros and +-equal magnitudes
    pairwise = nm_mask(w, n, m)
    by_sort = select_topk_rows(masks_mod._groups(w, m), n).reshape(w.shape)
    assert torch.equal(pairwise, by_sort)
    assert (_groups(pairwise, m).sum(-1) == n).all()


def test_ties_go_to_the_lower_index():
    assert nm_mask(torch.zeros(2, 8), 2, 4).tolist() == [[True, True, False, False] * 2] * 2
    assert nm_mask(torch.tensor([[1.0, -2.0, 2.0, 0.5]]), 1, 4).tolist() == [[False, True, False, False]]


def test_nan_counts_as_largest_and_keeps_n():
    w = torch.tensor([[0.1, float("nan"), 0.3, 0.2, float("nan"), float("nan"), float("nan"), 1.0]])
    mask = nm_mask(w, 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_conv_groups_run_along_flattened_cin_kh_kw():
    w = torch.randn(5, 3, 2, 2)  # K = 12
    flat = nm_mask(w.reshape(5, 12), 2, 4)
    assert torch.equal(nm_mask(w, 2, 4), flat.reshape(w.shape))


def test_kept_magnitude():
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    assert kept_magnitude(w, 2, 4) == pytest.approx(0.7)
    assert kept_magnitude(torch.zeros(1, 4), 2, 4) == 1.0


@pytest.mark.parametrize("shape", [(3, 5), (7, 8), (1, 1), (4, 2, 3)])
def test_pack_matches_numpy_and_roundtrips(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    ref = np.packbits(mask.numpy().reshape(-1), bitorder="little")
    assert packed.dtype == torch.uint8 and packed.numpy().tolist() == ref.tolist()
    assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.parametrize("n,m,match", [(2, 2, "`n` must be < `m`"), (3, 2, "`n` must be < `m`"),
                                       (0, 4, "`n` must be an integer >= 1"), (1, 0, "`m` must be an integer"),
                                       (1.5, 4, "`n` must be an integer")])
def test_bad_patterns(n, m, match):
    with pytest.raises(ValueError, match=match):
        check_nm(n, m)
    with pytest.raises(ValueError, match=match):
        nm_mask(torch.randn(4, 8), n, m)


def test_reduction_dim_not_multiple():
    with pytest.raises(ValueError, match="not a multiple of `m`=4"):
        nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="`weight` must have >= 2 dims"):
        nm_mask(torch.randn(8), 2, 4)
    assert not is_nm(torch.randn(4, 6), 2, 4)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.odd = nn.Linear(6, 8)
        self.conv = nn.Conv2d(3, 4, 3)  # K = 27
        self.conv_ok = nn.Conv2d(4, 4, 2)  # K = 16
        self.emb = nn.Embedding(10, 8)
        self.b = nn.Linear(16, 4)


def test_skip_rule_warns_once_naming_every_skipped_layer():
    with pytest.warns(UserWarning) as rec:
        layers = select_nm_layers(_Net(), 4)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "odd (K=6)" in msg and "conv (K=27)" in msg and "a (" not in msg
    assert list(layers) == ["a", "conv_ok", "b"]


def test_include_exclude():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(select_nm_layers(_Net(), 4, include=["a", "b"])) == ["a", "b"]
        assert list(select_nm_layers(_Net(), 4, include=["a", "b", "conv_ok"], exclude=["b"])) == ["a", "conv_ok"]
    assert list(select_nm_layers(_Net(), [4, 8], include=["a", "b"])) == ["a", "b"]


def test_layer_selection_errors():
    with pytest.raises(ValueError, match="divides the reduction dim of none"):
        select_nm_layers(_Net(), 32, include=["a", "odd"])
    with pytest.raises(ValueError, match="`include` pattern 'nope' matches no layer that can be sparsified"):
        select_nm_layers(_Net(), 4, include=["nope"])
    with pytest.raises(ValueError, match="`exclude` must be a list"):
        select_nm_layers(_Net(), 4, exclude="a")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 8), (3, 8), (5, 16)])
def test_broadcast_rank_equals_pairwise_rank(n, m, dtype):
    # The fused kernel's formulation, run eagerly: same ranks, same ties, NaN largest.
    g = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randint(-3, 4, (24, 4 * m), generator=g).to(dtype)  # many ties and zeros
    w[0, 1] = float("nan")
    w[3, 2] = float("-inf")
    ref = nm_mask(w, n, m)
    fused = masks_mod._broadcast_keep(w.reshape(-1, m), n).reshape(w.shape)
    assert torch.equal(fused, ref)


def test_nm_masks_returns_the_masks_and_counts_flips():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 16, generator=g), torch.randn(4, 2, 2, 2, generator=g)]
    olds = [nm_mask(ws[0], 2, 4), None]
    ws[0][0, :4] = torch.tensor([4.0, 3.0, 0.0, 0.0])  # group 0 of row 0 becomes [T, T, F, F]
    news, flips = nm_masks(ws, 2, 4, olds)
    assert all(torch.equal(a, nm_mask(w, 2, 4)) for a, w in zip(news, ws))
    assert flips.dtype == torch.int64 and int(flips) == int((news[0] != olds[0]).sum())
    assert nm_masks(ws, 2, 4)[1] is None


def test_nm_masks_rejects_bad_input():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="`m` must be <= 16"):
        nm_masks([torch.randn(4, 32)], 2, 32)
    with pytest.raises(ValueError, match="one entry per weight"):
        nm_masks([w], 2, 4, [None, None])
    with pytest.raises(ValueError, match="`olds` entries"):
        nm_masks([w], 2, 4, [torch.ones(4, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="not a multiple"):
        nm_masks([torch.randn(4, 6)], 2, 4)


def test_nm_masks_compiled_equals_eager(monkeypatch):
    # torch.compile on CPU (a C++ compiler is needed; on GPU the same graph becomes Triton kernels).
    g = torch.Generator().manual_seed(1)
    ws = [torch.randint(-2, 3, (16, 32), generator=g).float(), torch.randn(8, 4, 2, 2, generator=g)]
    ws[0][1, 5] = float("nan")
    olds = [nm_mask(torch.randn(16, 32, generator=g), 2, 4), None]
    monkeypatch.setattr(masks_mod, "_COMPILED", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        news, flips = nm_masks(ws, 2, 4, olds, compiled=True)
    # A fallback to eager warns: this must really have compiled.
    assert not [w for w in caught if "computing masks eagerly" in str(w.message)]
    assert "masks" in masks_mod._COMPILED and "masks_failed" not in masks_mod._COMPILED
    ref, ref_flips = nm_masks(ws, 2, 4, olds)
    assert all(torch.equal(a, b) for a, b in zip(news, ref))
    assert int(flips) == int(ref_flips)


_GROUPED = r"""
import torch
from sparsetrain.nm import grouped, nm_mask

g = torch.Generator().manual_seed(0)
for n, m in [(2, 4), (1, 8), (3, 5), (1, 2), (5, 16), (7, 8)]:
    ws = [torch.randint(-3, 4, (6, 24 * m), generator=g).float(),  # ties and zeros
          torch.randn(5, 2 * m, generator=g).to(torch.bfloat16), torch.randn(9, m, 2, generator=g).half(),
          torch.randn(3000, m, generator=g)]  # several programs of one layer
    ws[0][0, 1] = float("nan")
    ws[2][3, 0, 0] = float("-inf")
    assert grouped.available(ws, interpret=True)
    masks, pruned, flips = grouped.grouped_masks(ws, n, m, interpret=True)
    assert flips is None
    for w, k, p in zip(ws, masks, pruned):
        ref = nm_mask(w, n, m)
        assert k.dtype == torch.bool and torch.equal(k, ref) and torch.equal(p, ~ref), (n, m, w.shape)
    olds = [torch.rand(w.shape, generator=g) > 0.5 for w in ws]
    _, _, flips = grouped.grouped_masks(ws, n, m, olds, interpret=True)
    assert int(flips) == sum(int((nm_mask(w, n, m) != o).sum()) for w, o in zip(ws, olds))
    again, _, flips = grouped.grouped_masks(ws, n, m, masks, interpret=True)  # the previous call's buffer, reused
    assert int(flips) == 0 and all(torch.equal(a, b) for a, b in zip(again, masks))
    assert again[0].data_ptr() != masks[0].data_ptr()  # new tensors every call
    for w in ws:
        assert torch.equal(grouped.one_mask(w, n, m, interpret=True), nm_mask(w, n, m))  # no tables
    assert grouped.one_mask(ws[0], n, m) is None
    assert grouped.grouped_masks(ws, n, m) is None  # CPU tensors, outside the interpreter
    assert grouped.grouped_masks([ws[0].T], n, m, interpret=True) is None  # not contiguous
print("interpreted ok")
"""


def test_grouped_kernel_in_the_triton_interpreter():
    # The grouped Triton kernel (one launch for all layers, read through an address table) and the
    # table-free one-layer launch, on CPU tensors in Triton's interpreter.
    run_triton_interpreted(_GROUPED)


_SWAP = r"""
import torch
from sparsetrain.nm import grouped, nm_mask

g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    ws = [torch.randn(6, 96, generator=g), torch.randn(2500, 4, generator=g), torch.randn(3, 8, 2, 2, generator=g)]
    ws = [w.to(dtype) for w in ws]
    ws[0][0, 1] = float("inf")
    pruned = [~nm_mask(w, 2, 4) for w in ws]
    flat = torch.cat([p.reshape(-1) for p in pruned])
    tol = 2 ** -7 if dtype == torch.bfloat16 else 0  # the interpreter rounds fp32 to bf16 towards zero: one ulp
    for beta in (0.0, 0.3):
        dense = [w.clone() for w in ws]
        shadows = [torch.empty_like(w) for w in ws]
        assert grouped.swap(ws, shadows, flat, beta - 1.0, interpret=True)
        # addcmul's formula as on CUDA: in fp32, with the scalar in fp32 (torch on CPU rounds it to
        # the tensor's dtype first, so it is not the reference for bf16/fp16).
        for w, s, d, p in zip(ws, shadows, dense, pruned):
            assert torch.equal(s, d)
            ref = (d.float() + (beta - 1.0) * (d.float() * p)).to(dtype)
            torch.testing.assert_close(w, ref, rtol=tol, atol=0, equal_nan=True)  # inf - inf: NaN in both
        grads = [torch.randn(w.shape, generator=g).to(dtype) for w in ws]
        refs = [(gr.float() + 0.01 * (d.float() * p)).to(dtype) for gr, d, p in zip(grads, dense, pruned)]
        assert grouped.swap(ws, shadows, flat, 0.01, restore=True, grads=grads, interpret=True)
        assert all(torch.equal(w, d) for w, d in zip(ws, dense))
        for gr, r in zip(grads, refs):
            torch.testing.assert_close(gr, r, rtol=tol, atol=0, equal_nan=True)
        assert grouped.swap(ws, shadows, flat, 0.0, restore=True, interpret=True)  # no gradients: copy only
        assert all(torch.equal(w, d) for w, d in zip(ws, dense))
assert not grouped.swap(ws, shadows, flat, -1.0)  # CPU tensors, outside the interpreter
assert not grouped.swap(ws, [s.float() for s in shadows], flat, -1.0, interpret=True)  # other dtype
print("interpreted ok")
"""


def test_in_place_masking_kernel_in_the_triton_interpreter():
    # One launch masks every layer's weight in place (dense copy aside) or puts it back, adding
    # SR-STE's term to the gradients: equal to the torch ops the sparsifier runs elsewhere.
    run_triton_interpreted(_SWAP)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 8), (3, 8), (5, 16), (2, 6)])
def test_cuda_nm_masks_take_the_grouped_kernel_and_equal_nm_mask(n, m):
    from sparsetrain.nm import grouped

    g = torch.Generator().manual_seed(m)
    ws = [torch.randint(-3, 4, (64, 8 * m), generator=g).float(), torch.randn(768, 96 * m, generator=g),
          torch.randn(33, 4 * m, generator=g).to(torch.bfloat16), torch.randn(7, 2, 1, m, generator=g).half()]
    ws[0][0, 1] = float("nan")
    ws[1][5, 3] = float("inf")
    ws = [w.cuda() for w in ws]
    assert grouped.available(ws)
    olds = [torch.rand(w.shape, generator=g).cuda() > 0.5 for w in ws]
    news, flips = nm_masks(ws, n, m, olds, compiled=True)
    refs = [nm_mask(w, n, m) for w in ws]
    assert all(torch.equal(a, b) for a, b in zip(news, refs))
    assert int(flips) == sum(int((r != o).sum()) for r, o in zip(refs, olds))
    assert news[1].data_ptr() - news[0].data_ptr() == ws[0].numel()  # one flat buffer: the grouped kernel ran
    assert torch.equal(masks_mod.forward_mask(ws[1], n, m), refs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_in_place_masking_kernel_equals_the_torch_ops(dtype):
    from sparsetrain.nm import grouped

    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(768, 3072, generator=g), torch.randn(64, 96, generator=g), torch.randn(5, 8, 3, 4, generator=g)]
    ws = [w.to(dtype).cuda() for w in ws]
    pruned = [~nm_mask(w, 2, 4) for w in ws]
    flat = torch.cat([p.reshape(-1) for p in pruned])
    for factor, lam in ((-1.0, 2e-4), (-0.37, 0.05)):
        dense = [w.clone() for w in ws]
        shadows = [torch.empty_like(w) for w in ws]
        assert grouped.swap(ws, shadows, flat, factor)
        for w, s, d, p in zip(ws, shadows, dense, pruned):
            assert torch.equal(s, d) and torch.equal(w, torch.addcmul(d, d, p, value=factor))
        grads = [torch.randn(w.shape, generator=g).to(dtype).cuda() for w in ws]
        refs = [torch.addcmul(gr, d, p, value=lam) for gr, d, p in zip(grads, dense, pruned)]
        assert grouped.swap(ws, shadows, flat, lam, restore=True, grads=grads)
        assert all(torch.equal(w, d) for w, d in zip(ws, dense))
        assert all(torch.equal(gr, r) for gr, r in zip(grads, refs))
