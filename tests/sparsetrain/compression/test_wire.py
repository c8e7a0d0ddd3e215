import pytest
import torch

from sparsetrain.compression.wire import SegmentLayout, decode_values, encode_segments, encode_values, pack, unpack


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,d,e", [(7, 5, 2), (0, 3, 0), (4, 0, 1), (1, 1, 1)])
def test_pack_unpack_round_trip(dtype, k, d, e):
    g = torch.Generator().manual_seed(k + d)
    layout = SegmentLayout(k, d, e, dtype)
    assert layout.nbytes % 4 == 0
    segs, expected = [], []
    for r in range(3):
        idx = torch.randint(0, 1000, (k,), generator=g, dtype=torch.int32)
        vals = torch.randn(k, generator=g).to(dtype)
        dense = torch.randn(d, generator=g)
        scales = torch.rand(e, generator=g) + 0.5
        finite = torch.tensor(r != 1)
        segs.append(pack(layout, finite=finite, scales_E=scales, indices_K=idx, values_K=vals, dense_D=dense))
        expected.append((finite, scales, idx, vals, dense))
    finite_W, scales_WE, idx_WK, vals_WK, dense_WD = unpack(torch.cat(segs), layout, 3)
    for r, (f, s, i, v, dn) in enumerate(expected):
        assert bool(finite_W[r]) == bool(f)
        assert torch.equal(scales_WE[r], s)
        assert torch.equal(idx_WK[r], i)
        assert torch.equal(vals_WK[r], v)
        assert torch.equal(dense_WD[r], dn)


def test_pack_checks_sizes():
    layout = SegmentLayout(2, 1, 1)
    with pytest.raises(ValueError, match="`indices_K`/`values_K` must have 2"):
        pack(layout, finite=torch.tensor(True), scales_E=torch.ones(1), indices_K=torch.zeros(3, dtype=torch.int32),
             values_K=torch.zeros(3), dense_D=torch.zeros(1))
    with pytest.raises(ValueError, match="`dense_D` must have 1"):
        pack(layout, finite=torch.tensor(True), scales_E=torch.ones(1), indices_K=torch.zeros(2, dtype=torch.int32),
             values_K=torch.zeros(2), dense_D=torch.zeros(2))
    with pytest.raises(ValueError, match="`gathered` must be uint8"):
        unpack(torch.zeros(5, dtype=torch.uint8), layout, 2)


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4, 1e6, 1e12])
def test_fp16_values_are_scaled_not_overflowed(magnitude):
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * magnitude
    wire, scale = encode_values(v, torch.float16)
    assert wire.dtype == torch.float16 and torch.isfinite(wire).all()
    amax = wire.float().abs().max()
    assert 2**14 <= amax < 2**15  # largest value uses fp16's range
    m, _ = torch.frexp(scale)
    assert m == 0.5  # a power of two: scaling is exact
    back = decode_values(wire, scale)
    torch.testing.assert_close(back, v, rtol=1e-3, atol=0.0)
    # error feedback is exact: what rounding took off plus what was sent is the value
    assert torch.equal(back + (v - back), v)


def test_bf16_and_fp32_values():
    v = torch.randn(100) * 1e20
    wire, scale = encode_values(v, torch.bfloat16)
    assert wire.dtype == torch.bfloat16 and scale == 1
    wire, scale = encode_values(v, torch.float32)
    assert wire is v and scale == 1


def test_fp16_all_zero_and_empty():
    wire, scale = encode_values(torch.zeros(4), torch.float16)
    assert scale == 1 and torch.equal(wire, torch.zeros(4, dtype=torch.float16))
    wire, scale = encode_values(torch.zeros(0), torch.float16)
    assert scale == 1 and wire.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_segments_matches_per_tensor_encoding(dtype):
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(5, generator=g) * 1e5, torch.randn(3, generator=g) * 1e-4, torch.zeros(2)]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 3, 2]))
    wire, scales, decoded = encode_segments(torch.cat(parts), dtype, seg, 3)
    for i, part in enumerate(parts):
        w, s = encode_values(part, dtype)
        sl = seg == i
        assert torch.equal(wire[sl], w) and scales[i] == s
        assert torch.equal(decoded[sl], decode_values(w, s))
