import math

import pytest
import torch

from sparsetrain.compression import _topk_cpu, _topk_cuda
from sparsetrain.compression.topk import (
    DEFAULT_TUNING,
    TopkTuning,
    num_selected,
    sample_stride,
    select_indices,
    threshold_indices,
    threshold_indices_segments,
    topk_indices,
)
from sparsetrain.selection import topk_positions
from tests.harness import run_triton_interpreted


def _is_top_set(x, idx):
    """Everything selected is at least as large (in magnitude) as everything left out."""
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[idx] = True
    if mask.all() or not mask.any():
        return True
    return bool(x.abs()[mask].min() >= x.abs()[~mask].max())


@pytest.mark.parametrize("numel,density,expected", [(1000, 0.001, 1), (1000, 0.01, 10), (10, 0.001, 1),
                                                    (999, 0.01, 10), (64, 1.0, 64)])
def test_num_selected(numel, density, expected):
    assert num_selected(numel, density) == expected


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_num_selected_rejects_density(density):
    with pytest.raises(ValueError, match="`density` must be in \\(0, 1\\]"):
        num_selected(100, density)


def test_sample_stride_small_tensors_are_sampled_densely():
    assert sample_stride(100_000_000, 0.001, 0.01) == 100  # 1% sample
    assert sample_stride(10_000, 0.001, 0.01) == 1  # too few hits at 1%: whole tensor
    s = sample_stride(1_000_000, 0.01, 0.01)
    assert 1_000_000 // s * 0.01 >= 32


@pytest.mark.parametrize("k", [1, 7, 100, 999, 1000])
@pytest.mark.parametrize("kind", ["plain", "ties", "nan_and_inf", "zeros"])
def test_topk_indices_is_the_exact_top_set(k, kind):
    # ascending positions of the k largest |x|: equal magnitudes by position, NaN last
    x = _awkward(kind, 1000, torch.Generator().manual_seed(k))
    idx = topk_indices(x, k)
    mag = torch.nan_to_num(x.abs(), nan=-1.0)
    expected = torch.sort(torch.sort(mag, descending=True, stable=True).indices[:k]).values
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("numel,density", [(200_000, 0.001), (50_000, 0.01), (8192, 0.05)])
def test_threshold_indices_returns_a_top_set_near_k(seed, numel, density):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.rand(numel, generator=g)
    k = num_selected(numel, density)
    stride = sample_stride(numel, density, 0.01)
    idx = threshold_indices(x, k, stride=stride, offset=seed)
    assert idx.unique().numel() == idx.numel()
    assert 0.8 * k <= idx.numel() <= k
    assert _is_top_set(x, idx)


def test_threshold_indices_is_deterministic_and_rank_independent():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    a = threshold_indices(x, 100, stride=50, offset=17)
    b = threshold_indices(x.clone(), 100, stride=50, offset=17)
    assert torch.equal(a, b)


def test_threshold_indices_with_stride_one_is_exact():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    assert set(threshold_indices(x, 50, stride=1).tolist()) == set(topk_indices(x, 50).tolist())


def test_threshold_lowers_until_enough_pass():
    # A sample that sees only the few huge entries sets the threshold far too high;
    # the rounds must lower it (x0.8 each) until >= 0.8k entries pass.
    x = torch.full((10_000,), 1.0)
    x[::100] = 1.5  # 100 entries, all in the sample at stride 100
    idx = threshold_indices(x, 200, stride=100, offset=0, max_rounds=10)
    assert 160 <= idx.numel() <= 200
    assert _is_top_set(x, idx)


def test_threshold_gives_up_after_max_rounds():
    x = torch.full((10_000,), 1.0)
    x[::100] = 100.0
    idx = threshold_indices(x, 200, stride=100, offset=0, max_rounds=2)
    assert idx.numel() == 100  # only the spikes pass after 2 rounds (100 * 0.8 > 1)


def test_all_zero_tensor():
    idx = threshold_indices(torch.zeros(10_000), 10, stride=100)
    assert idx.numel() == 10


def test_select_indices_dispatch_and_errors():
    x = torch.randn(4096)
    assert set(select_indices(x, 10, "topk").tolist()) == set(topk_indices(x, 10).tolist())
    assert select_indices(x, 10, "threshold").numel() <= 10
    with pytest.raises(ValueError, match="`method` must be"):
        select_indices(x, 10, "random")
    with pytest.raises(ValueError, match="`k` must be in"):
        topk_indices(x, 0)
    with pytest.raises(ValueError, match="`x_N` must be 1-D"):
        topk_indices(x.view(64, 64), 3)
    with pytest.raises(ValueError, match="`stride` must be"):
        threshold_indices(x, 3, stride=0)
    assert math.isclose(sample_stride(10**6, 1.0, 1.0), 1)


def test_threshold_usually_keeps_exactly_k():
    # the sampled threshold aims 30% above k, so the candidates are trimmed to exactly k
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(7))
    k = num_selected(x.numel(), 0.001)
    stride = sample_stride(x.numel(), 0.001, 0.01)
    counts = [threshold_indices(x, k, stride=stride, offset=o).numel() for o in range(10)]
    assert sum(c == k for c in counts) >= 8, counts
    assert min(counts) >= 0.8 * k  # the lower bound holds always


def test_margin_is_checked():
    with pytest.raises(ValueError, match="`margin` must be >= 1"):
        threshold_indices(torch.randn(100), 3, stride=2, margin=0.5)


# ----------------------------------------------------------------------------- the CPU search


def _plain_threshold_indices(x, k, stride, offset, lower_bound=0.8, max_rounds=10, margin=1.3):
    """The sampled-threshold selection written the straightforward way (one full mask per round)."""
    n = x.numel()
    if stride == 1 or k >= n:
        return topk_indices(x, k)
    mag = x.abs()
    sample = mag[offset % stride :: stride]
    k_s = min(sample.numel(), max(1, math.ceil(margin * k * sample.numel() / n)))
    threshold = torch.topk(sample, k_s, sorted=False).values.min()
    for round_ in range(max_rounds):
        idx = (mag >= threshold).nonzero().view(-1)
        if idx.numel() >= lower_bound * k or round_ == max_rounds - 1:
            break
        threshold = threshold * lower_bound
    if idx.numel() > k:  # the k largest candidates (the rule's selection, tested in test_selection.py)
        idx = idx[topk_positions(mag[idx], k, ascending=False)]
    return idx


def _awkward(kind, n, g):
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g)
    if kind == "ties":
        x = torch.round(x * 4) / 4
    elif kind == "mostly_zero":
        x[torch.rand(n, generator=g) < 0.95] = 0.0
    elif kind == "signed_zeros":
        x = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        x[::97] = 1.0
    elif kind == "nan_in_sample":
        x[5::7] = float("nan")
    elif kind == "nan_and_inf":
        x[n // 2] = float("nan")
        x[3] = float("inf")
        x[-1] = float("-inf")
    elif kind == "nan_in_tail":
        x[-2] = float("nan")
    elif kind == "zeros":
        x = torch.zeros(n)
    return x


# 0.001 and 0.002 take the column-maxima search, 0.01 and 0.0625 the full mask; the sizes leave
# tails of every length after the R x M layout (M a multiple of the stride).
@pytest.mark.parametrize("kind", ["plain", "ties", "mostly_zero", "signed_zeros", "nan_in_sample", "nan_and_inf",
                                  "nan_in_tail", "zeros"])
@pytest.mark.parametrize("numel", [65_536, 100_003, 262_151])
@pytest.mark.parametrize("density", [0.001, 0.002, 0.01, 0.0625])
def test_cpu_search_gives_exactly_the_plain_result(kind, numel, density):
    g = torch.Generator().manual_seed(numel + int(density * 1e4))
    x = _awkward(kind, numel, g)
    k = num_selected(numel, density)
    stride = sample_stride(numel, density, 0.01)
    for offset in (0, 3, 1001):
        expected = _plain_threshold_indices(x, k, stride, offset)
        got = threshold_indices(x, k, stride=stride, offset=offset)
        assert torch.equal(got, expected), (kind, numel, density, offset)
        scratch = torch.full((numel,), 7.0)
        mask = torch.ones(numel + 64, dtype=torch.bool)  # dirty scratch buffers must not matter
        got = threshold_indices(x, k, stride=stride, offset=offset, scratch=scratch, mask_scratch=mask)
        assert torch.equal(got, expected), (kind, numel, density, offset, "scratch")


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.02, 0.2, 0.7, 1.0])
@pytest.mark.parametrize("numel", [8, 64, 4096, 65_536])
def test_true_positions_is_nonzero(fraction, numel):
    mask = torch.rand(numel + 8, generator=torch.Generator().manual_seed(numel)) < fraction
    for m in (mask[:numel], mask[8 : numel + 8], mask[3 : numel + 3]):  # the last one is not word-aligned
        assert torch.equal(_topk_cpu._true_positions(m), m.nonzero().view(-1))


@pytest.mark.parametrize("kind", ["plain", "ties", "mostly_zero", "nan_and_inf", "nan_in_tail", "zeros"])
@pytest.mark.parametrize("numel", [4096, 100_003])
def test_grouped_search_equals_the_plain_mask(kind, numel):
    g = torch.Generator().manual_seed(numel)
    x = _awkward(kind, numel, g)
    search = _topk_cpu._grouped_at_least(x, 16)
    for t in (0.0, 0.3, 1.0, float("inf")):
        t = torch.tensor(t)
        assert torch.equal(search(t), (x.abs() >= t).nonzero().view(-1)), (kind, t)


def _sorted_magnitudes(x, idx):
    return torch.sort(x[idx].abs().cpu()).values


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("search,final,kth", [("grouped", "sort", "topk"), ("mask", "topk", "topk"),
                                              ("grouped", "topk", "sort"), ("mask", "sort", "sort"),
                                              ("compact", "sort", "sort"), ("compact", "sort", "topk")])
@pytest.mark.parametrize("kind", ["plain", "ties", "mostly_zero", "nan_and_inf", "nan_in_tail"])
@pytest.mark.parametrize("numel,density", [(262_151, 0.001), (2_000_003, 0.001), (262_151, 0.01)])
def test_cuda_selection_keeps_the_plain_result(search, final, kth, kind, numel, density):
    # Same count and the same magnitudes as the plain CPU computation (which of several equal
    # magnitudes at the k-th place are kept may differ with the "topk" final step).
    tuning = TopkTuning(cuda_search=search, cuda_final=final, cuda_sample_kth=kth)
    g = torch.Generator().manual_seed(numel)
    x = _awkward(kind, numel, g)
    k = num_selected(numel, density)
    stride = sample_stride(numel, density, 0.01)
    for offset in (0, 5):
        expected = _plain_threshold_indices(x, k, stride, offset)
        got = threshold_indices(x.cuda(), k, stride=stride, offset=offset, tuning=tuning).cpu()
        assert got.numel() == expected.numel() and got.unique().numel() == got.numel()
        if final == "sort":  # the rule: the same positions
            assert torch.equal(torch.sort(got).values, torch.sort(expected).values)
        torch.testing.assert_close(_sorted_magnitudes(x, got), _sorted_magnitudes(x, expected),
                                   rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["plain", "ties", "mostly_zero", "signed_zeros", "nan_and_inf", "zeros"])
def test_cuda_compact_search_equals_mask_and_sort_in_order(dtype, kind):
    # The Triton compaction returns the very tensor (same positions, same order) that the
    # mask search with the stable-sort final step returns.
    from sparsetrain.compression import compact

    if not compact.available(torch.zeros(1, device="cuda")):
        pytest.skip("Triton is not available")
    numel, density = 1_000_003, 0.001
    x = _awkward(kind, numel, torch.Generator().manual_seed(7)).to(dtype).cuda()
    k = num_selected(numel, density)
    stride = sample_stride(numel, density, 0.01)
    for offset in (0, 5, 11):
        expected = threshold_indices(x, k, stride=stride, offset=offset,
                                     tuning=TopkTuning(cuda_search="mask", cuda_final="sort"))
        got = threshold_indices(x, k, stride=stride, offset=offset, tuning=TopkTuning(cuda_search="compact"))
        assert torch.equal(got, expected), (kind, dtype, offset)
    for tv in (0.0, 0.5, float("inf"), float("nan")):  # 0: everything but NaN passes
        t = torch.tensor(tv, dtype=dtype, device="cuda")
        pos, bits = compact.split(compact.at_least(x, t))
        hits = (x.abs() >= t).nonzero().view(-1)
        assert torch.equal(pos, hits) and torch.equal(bits.view(torch.float32), x[hits].abs().float()), tv


_INTERPRETED = """
import torch
from sparsetrain.compression import compact
from tests.sparsetrain.compression.test_topk import _awkward

compact._kernel = compact._build()
for n in (1, 4096 * 2 + 17):
    x = _awkward("ties", n, torch.Generator().manual_seed(n))
    if n > 8:
        x[3], x[4], x[5] = float("nan"), float("inf"), -0.0
    for tv in (0.0, 0.5, float("inf"), float("nan")):
        t = torch.tensor(tv)
        pos, bits = compact.split(compact.at_least(x, t))
        hits = (x.abs() >= t).nonzero().view(-1)
        count, starts = compact.count_at_least(x, t)
        assert int(count) == hits.numel()
        if hits.numel() > 3:  # room for only 3: the first 3 hits, in order
            assert torch.equal(compact.split(compact.write_hits(x, t, starts, 3))[0], hits[:3])
        assert torch.equal(pos, hits), (n, tv)
        assert torch.equal(bits.view(torch.float32), x[hits].abs()), (n, tv)
# The CUDA selection around the kernels: rounds, more hits than the reserved room, the final sort.
from sparsetrain.compression._topk_cuda import _compact_select
x = _awkward("ties", 8209, torch.Generator().manual_seed(1))
x[7] = float("nan")
for k, t0 in ((10, 0.0), (10, 0.9), (50, 5.0), (3000, 0.5), (8000, 0.0)):
    t = torch.tensor(t0)
    for _ in range(10):  # the plain rounds
        hits = (x.abs() >= t).nonzero().view(-1)
        if hits.numel() >= 0.8 * k:
            break
        t = t * 0.8
    if hits.numel() > k:
        hits = hits[torch.sort(x[hits].abs(), descending=True, stable=True).indices[:k]]
    got = _compact_select(x, k, torch.tensor(t0), 0.8, 10, 1.3)
    assert torch.equal(got, hits), (k, t0)
# Several segments at once (the CUDA search of threshold_indices_segments): against the plain
# per-segment search. Segments of zeros, NaN in a sample (rounds, done alone), stride 1 and k = n.
from sparsetrain.compression._topk_cuda import _compact_segments
from sparsetrain.compression.topk import threshold_indices


def plain(x, s, n, k, stride, offset):
    if stride == 1 or k >= n:
        return threshold_indices(x[s : s + n], k, stride=stride) + s
    v = x[s : s + n]
    o = offset % stride
    sample = v[o::stride].abs()
    desc = torch.sort(sample, descending=True).values
    t = desc[min(sample.numel(), max(1, math.ceil(1.3 * k * sample.numel() / n))) - 1]
    t = desc[0] if torch.isnan(desc[0]) else t
    for round_ in range(10):
        hits = (v.abs() >= t).nonzero().view(-1)
        if hits.numel() >= 0.8 * k or round_ == 9:
            break
        t = t * 0.8
    if hits.numel() > k:
        hits = hits[torch.sort(v[hits].abs(), descending=True, stable=True).indices[:k]]
    return hits + s


import math
x = _awkward("ties", 40_000, torch.Generator().manual_seed(2))
x[5_000:8_000] = 0.0
x[12_000:12_600:7] = float("nan")
x[30_001] = float("inf")
segments = [(100, 4_900, 49, 7), (5_000, 3_000, 100, 3), (8_003, 9, 9, 1), (9_000, 6_000, 60, 5),
            (15_000, 4_100, 600, 2), (20_000, 2_500, 10, 13), (25_000, 12_000, 120, 11)]
for offset in (0, 5, 12):
    got, counts = _compact_segments(x, segments, offset, 0.8, 10, 1.3,
                                    lambda s, n, k, st: plain(x, s, n, k, st, offset))
    expected = [plain(x, *seg, offset) for seg in segments]
    assert counts == [e.numel() for e in expected], (offset, counts)
    assert torch.equal(got, torch.cat(expected)), offset
# Other block sizes and warps, given as arguments (what benchmarks/gpu_topk.py --tune times).
x = torch.randn(50_000, generator=torch.Generator().manual_seed(3))
t = torch.tensor(2.0)
hits = (x.abs() >= t).nonzero().view(-1)
for block in (1024, 4096):
    c, starts = compact.count_at_least(x, t, block=block, warps=8)
    pos, _ = compact.split(compact.write_hits(x, t, starts, int(c), block=block, warps=8)[: int(c)])
    assert int(c) == hits.numel() and torch.equal(pos, hits), block
print("interpreted ok")
"""


def test_block_table_covers_each_segment_without_straddling():
    from sparsetrain.compression import compact

    bounds = [(0, 1), (5, compact.BLOCK), (2000, 3 * compact.BLOCK + 7), (9000, compact.BLOCK - 1)]
    table, last = compact.block_table(bounds, torch.device("cpu"))
    covered = {}
    for start, end, g in table.tolist():
        s, n = bounds[g]
        assert end == s + n and s <= start < end and start - s == (start - s) // compact.BLOCK * compact.BLOCK
        covered.setdefault(g, []).extend(range(start, min(start + compact.BLOCK, end)))
    assert all(covered[g] == list(range(s, s + n)) for g, (s, n) in enumerate(bounds))
    assert table[last, 2].tolist() == list(range(len(bounds)))  # each segment's last block
    assert last.tolist() == [0, 1, 5, 6]
    for bad in ([(0, 10), (5, 10)], [(10, 5), (0, 5)], [(0, 0)]):
        with pytest.raises(ValueError, match="`bounds` must be ascending"):
            compact.block_table(bad, torch.device("cpu"))


def test_compact_kernel_in_the_triton_interpreter():
    # The kernels' logic (block counts, offsets, the room reserved) on CPU tensors, where Triton
    # is installed: its interpreter runs the same program without a GPU.
    run_triton_interpreted(_INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kth_largest_by_sort_equals_topk():
    g = torch.Generator().manual_seed(3)
    for n, k in ((1, 1), (1000, 1), (1000, 37), (100_003, 1300)):
        for nans in (0, 1, 5):
            v = torch.round(torch.rand(n, generator=g) * 64) / 64  # ties
            v[torch.randperm(n, generator=g)[:nans]] = float("nan")
            v = v.cuda()
            ref = _topk_cuda._kth_largest(v, k, by_sort=False)
            got = _topk_cuda._kth_largest(v, k, by_sort=True)
            torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- many segments at once


def _per_segment(x, segments, offset, **kw):
    parts = [threshold_indices(x[s : s + n], k, stride=stride, offset=offset, **kw) + s for s, n, k, stride in segments]
    return torch.cat(parts), [p.numel() for p in parts]


def _layout(name, density):
    """(start, numel) of the segments of one flat tensor, with gaps (1-D tensors sent whole) between them."""
    if name == "layers":  # the same 4 weights in 3 layers (two-level spacing), an odd one at the end
        layer = [65_536, 256, 65_536, 256, 32_768, 1024]
        sizes = layer * 3 + [65_536]
    elif name == "mixed":  # unequal sizes and spacings, tails after the R x M layout
        sizes = [100_003, 17, 65_536, 300, 262_151, 5, 65_536, 40_000, 65_536, 3, 4096]
    elif name == "small":  # exact selection (stride 1) and the mask search only
        sizes = [4096, 100, 2048, 4096, 7, 4096]
    pos, out = 0, []
    for n in sizes:
        if n >= 2048:
            k = num_selected(n, density)
            out.append((pos, n, k, sample_stride(n, density, 0.01)))
        pos += n
    return out, pos


@pytest.mark.parametrize("kind", ["plain", "ties", "mostly_zero", "signed_zeros", "nan_in_sample", "nan_and_inf",
                                  "nan_in_tail", "zeros"])
@pytest.mark.parametrize("layout", ["layers", "mixed", "small"])
@pytest.mark.parametrize("density", [0.001, 0.002, 0.01, 0.0625])
def test_segments_give_exactly_the_per_tensor_result(kind, layout, density):
    segments, n = _layout(layout, density)
    g = torch.Generator().manual_seed(n + int(density * 1e4))
    x = _awkward(kind, n, g)
    for offset in (0, 3, 1001):
        expected, counts = _per_segment(x, segments, offset)
        got, got_counts = threshold_indices_segments(x, segments, offset=offset)
        assert torch.equal(got, expected), (kind, layout, density, offset)
        assert got_counts == counts
        scratch = torch.full((n,), 7.0)
        mask = torch.ones(n + 64, dtype=torch.bool)  # dirty scratch buffers must not matter
        got, _ = threshold_indices_segments(x, segments, offset=offset, scratch=scratch, mask_scratch=mask)
        assert torch.equal(got, expected), (kind, layout, density, offset, "scratch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["plain", "ties", "mostly_zero", "signed_zeros", "nan_in_sample", "nan_and_inf",
                                  "zeros"])
@pytest.mark.parametrize("layout", ["layers", "mixed", "small"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.0625])
def test_cuda_segments_give_exactly_the_per_tensor_result(kind, layout, density):
    # One search for all segments (one wait for the device) against one search per segment.
    from sparsetrain.compression import compact

    if not compact.available(torch.zeros(1, device="cuda")):
        pytest.skip("Triton is not available")
    segments, n = _layout(layout, density)
    x = _awkward(kind, n, torch.Generator().manual_seed(n + int(density * 1e4))).cuda()
    for offset in (0, 3, 1001):
        expected, counts = _per_segment(x, segments, offset)
        got, got_counts = threshold_indices_segments(x, segments, offset=offset)
        assert torch.equal(got, expected) and got_counts == counts, (kind, layout, density, offset)


def test_segments_ignore_what_lies_between_them():
    segments, n = _layout("mixed", 0.001)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    covered = torch.zeros(n, dtype=torch.bool)
    for s, m, _, _ in segments:
        covered[s : s + m] = True
    y = x.masked_fill(~covered, float("nan"))
    assert torch.equal(threshold_indices_segments(y, segments, offset=5)[0], _per_segment(x, segments, 5)[0])


@pytest.mark.parametrize("max_rounds", [1, 2, 10])
def test_segments_lower_the_threshold_like_the_per_tensor_search(max_rounds):
    # spikes in the sample set the first threshold far too high in some segments, so that x0.8
    # rounds follow; the first three take the mask search, the last two the column maxima
    x = torch.full((520_000,), 1.0)
    x[:10_000:100] = 1.5
    x[30_000:40_000:100] = 100.0
    x[50_000:70_000] = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    x[100_000:300_000:2000] = 1.5
    x[300_000:500_000:2000] = 100.0
    segments = [(0, 10_000, 200, 100), (10_000, 10_000, 200, 100), (30_000, 10_000, 200, 100),
                (50_000, 20_000, 20, 100), (100_000, 200_000, 200, 100), (300_000, 200_000, 200, 100)]
    expected, counts = _per_segment(x, segments, 0, max_rounds=max_rounds)
    got, got_counts = threshold_indices_segments(x, segments, offset=0, max_rounds=max_rounds)
    assert torch.equal(got, expected) and got_counts == counts
    if torch.cuda.is_available():  # the CUDA search over all segments at once: the same rounds
        expected, counts = _per_segment(x.cuda(), segments, 0, max_rounds=max_rounds)
        got, got_counts = threshold_indices_segments(x.cuda(), segments, offset=0, max_rounds=max_rounds)
        assert torch.equal(got, expected) and got_counts == counts


def test_segments_on_a_view_and_empty():
    base = torch.randn(300_000, generator=torch.Generator().manual_seed(2))
    x = base[1000:]  # storage offset: the strided views must start at the view, not the storage
    segments = [(0, 65_536, 66, 2), (65_536, 65_536, 66, 2), (200_000, 65_536, 66, 2)]
    assert torch.equal(threshold_indices_segments(x, segments, offset=1)[0], _per_segment(x, segments, 1)[0])
    idx, counts = threshold_indices_segments(x, [])
    assert idx.numel() == 0 and counts == []


@pytest.mark.parametrize("segments,match", [
    ([(0, 100, 1, 1), (50, 100, 1, 1)], "`segments` must be ascending"),
    ([(0, 2000, 1, 1)], "`segments` must be ascending"),
    ([(0, 100, 0, 1)], "`k` must be in"),
    ([(0, 100, 1, 0)], "`stride` must be >= 1"),
])
def test_segments_are_checked(segments, match):
    with pytest.raises(ValueError, match=match):
        threshold_indices_segments(torch.randn(1000), segments)


def test_blocks_cover_the_starts_with_strided_views():
    starts = [0, 10, 20, 100, 110, 120, 200, 210, 220, 500, 600, 601]
    blocks = _topk_cpu._blocks(starts)
    assert blocks[0] == (0, (3, 3), (100, 10))
    covered = []
    for first, lengths, spacings in blocks:
        grid = torch.zeros(lengths, dtype=torch.long)
        for d, (length, spacing) in enumerate(zip(lengths, spacings)):
            grid = grid + (torch.arange(length) * spacing).view([-1 if i == d else 1 for i in range(len(lengths))])
        covered += (grid.view(-1) + starts[first]).tolist()
    assert covered == starts


def test_tuning_changes_no_cpu_result_and_is_checked():
    x = _awkward("ties", 262_151, torch.Generator().manual_seed(5))
    k = num_selected(x.numel(), 0.002)
    stride = sample_stride(x.numel(), 0.002, 0.01)
    expected = threshold_indices(x, k, stride=stride, offset=3)
    assert torch.equal(expected, threshold_indices(x, k, stride=stride, offset=3, tuning=DEFAULT_TUNING))
    for tuning in (TopkTuning(grouped_below=0.0), TopkTuning(grouped_below=1.0), TopkTuning(group_rows=7)):
        assert torch.equal(threshold_indices(x, k, stride=stride, offset=3, tuning=tuning), expected), tuning
    segments, n = _layout("mixed", 0.002)
    y = _awkward("ties", n, torch.Generator().manual_seed(6))
    expected = threshold_indices_segments(y, segments, offset=2)[0]
    got = threshold_indices_segments(y, segments, offset=2, tuning=TopkTuning(grouped_below=0.0, group_rows=5))[0]
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="`cuda_search` must be one of"):
        TopkTuning(cuda_search="fast")
    with pytest.raises(ValueError, match="`group_rows` must be an integer >= 1"):
        TopkTuning(group_rows=0)
    with pytest.raises(ValueError, match="`grouped_below` must be in"):
        TopkTuning(grouped_below=2.0)
    with pytest.raises(TypeError, match="`tuning` must be a TopkTuning"):
        threshold_indices(x, k, stride=stride, tuning={"cuda_search": "mask"})
    with pytest.raises(AttributeError):
        DEFAULT_TUNING.group_rows = 8  # frozen: no module-wide knob to flip


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("kind", ["plain", "ties", "nan_and_inf", "zeros"])
def test_cuda_mask_search_pieces_on_the_cpu(grouped, kind):
    # The "mask" / "grouped" search of the CUDA path, run eagerly on CPU tensors: the plain threshold
    # and the plain entries at or above it.
    x = _awkward(kind, 100_003, torch.Generator().manual_seed(8))
    k = num_selected(x.numel(), 0.001)
    stride = sample_stride(x.numel(), 0.001, 0.01)
    o = 3
    sample = x[o::stride].abs()
    k_s = min(sample.numel(), max(1, math.ceil(1.3 * k * sample.numel() / x.numel())))
    threshold, at_least, magnitudes = _topk_cuda._mask_search(
        x, o, stride, k_s, 1.3 * k / x.numel(), grouped=grouped, by_sort=True, fused=False, rows=16,
        grouped_below=0.005)
    torch.testing.assert_close(threshold, torch.topk(sample, k_s).values.min(), rtol=0, atol=0, equal_nan=True)
    for t in (threshold, torch.tensor(0.5), torch.tensor(0.0)):
        idx = at_least(t)
        assert torch.equal(idx, (x.abs() >= t).nonzero().view(-1))
        assert torch.equal(magnitudes(idx), x[idx].abs())
