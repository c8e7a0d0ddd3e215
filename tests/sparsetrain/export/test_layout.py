import numpy as np
import pytest
import torch

from sparsetrain.export import check_24, compress_24, decompress_24
from sparsetrain.export.layout import pack_bits, unpack_bits
from sparsetrain.nm import nm_exact


def _weight_24(rows, cols, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nm_exact(torch.randn(rows, cols, generator=g), 2, 4).to(dtype)


@pytest.mark.parametrize("cols", [4, 8, 12, 20, 64])
def test_pack_bits_is_numpy_packbits_little(cols):
    g = torch.Generator().manual_seed(cols)
    mask = torch.rand(5, cols, generator=g) > 0.5
    ref = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(pack_bits(mask).numpy(), ref)
    back, clean = unpack_bits(pack_bits(mask), cols)
    assert clean and torch.equal(back, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 8), (16, 12), (1, 4)])
def test_compress_is_row_order_values_and_round_trips(dtype, shape):
    w = _weight_24(*shape, dtype=dtype)
    compressed, bitmask, size = compress_24(w)
    rows, cols = shape
    assert compressed.dtype == dtype and compressed.shape == (rows, cols // 2)
    assert bitmask.dtype == torch.uint8 and bitmask.shape == (rows, (cols + 7) // 8)
    assert size.dtype == torch.int64 and size.tolist() == [[rows], [cols]]
    mask, _ = unpack_bits(bitmask, cols)
    # the straightforward reference: the kept entries of each row, left to right
    for r in range(rows):
        assert torch.equal(compressed[r], w[r][mask[r]])
    assert (mask.reshape(rows, -1, 4).sum(-1) == 2).all()
    assert torch.equal(decompress_24(compressed, bitmask, shape), w)


def test_groups_with_fewer_nonzeros_keep_the_first_zero_positions():
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    compressed, bitmask, _ = compress_24(w)
    mask, _ = unpack_bits(bitmask, 8)
    assert mask.tolist() == [[True, False, False, True, True, True, False, False]]
    assert compressed.tolist() == [[0.0, 5.0, 0.0, 0.0]]


def test_negative_zero_is_stored_as_positive_zero():
    w = torch.tensor([[-0.0, 1.0, -0.0, 2.0]])
    compressed, bitmask, shape = compress_24(w)
    out = decompress_24(compressed, bitmask, (1, 4))
    assert not torch.signbit(out).any() and not torch.signbit(compressed).any()
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 2.0]]))


def test_not_24_names_the_layer_and_the_first_bad_group():
    w = _weight_24(4, 8)
    w[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"fc is not 2:4: row 2, group 1 \(columns 4-7\) holds 3 nonzeros"):
        check_24(w, "fc")
    with pytest.raises(ValueError, match="multiple of 4"):
        check_24(torch.zeros(2, 6), "fc")


def test_decompress_refuses_three_kept_in_a_group_and_set_padding_bits():
    compressed, bitmask, _ = compress_24(_weight_24(2, 12))
    bad = bitmask.clone()
    bad[1, 0] = 0b0011_0111  # group 0 of row 1 keeps 3 (bit j is column j)
    with pytest.raises(ValueError, match="keeps 3 entries in row 1, group 0"):
        decompress_24(compressed, bad, (2, 12))
    bad = bitmask.clone()
    bad[0, 1] |= 0b1000_0000  # column 15 of a 12-column row
    with pytest.raises(ValueError, match="padding"):
        decompress_24(compressed, bad, (2, 12))
    with pytest.raises(ValueError, match="compressed has shape"):
        decompress_24(compressed[:, :4], bitmask, (2, 12))
