"""compressed-tensors 0.12.2's Sparse24BitMaskCompressor reads our export bit for bit, and we read its."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsetrain.export import load_24, save_24
from sparsetrain.export.config import read_config

from .conftest import TwoFour

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import Sparse24BitMaskCompressor  # noqa: E402
from compressed_tensors.config import Sparse24BitMaskConfig  # noqa: E402


def _compressor():
    return Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 700])
def test_compressed_tensors_decodes_our_export(tmp_path, dtype, max_shard_bytes):
    model = TwoFour(dtype)
    save_24(model, tmp_path, targets=["fc*"], max_shard_bytes=max_shard_bytes)
    decoded = dict(_compressor().decompress(str(tmp_path)))
    ref = model.state_dict()
    assert set(decoded) == set(ref)
    for k, v in ref.items():
        assert decoded[k].dtype == v.dtype and torch.equal(decoded[k].view(-1).view(torch.uint8),
                                                           v.view(-1).view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_we_load_what_compressed_tensors_writes(tmp_path, dtype):
    model = TwoFour(dtype)
    state = model.state_dict()
    written = _compressor().compress(state, compression_targets={"fc1", "fc2"})
    assert "fc1.bitmask" in written and "fc1.weight" not in written
    save_file({k: v.contiguous() for k, v in written.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "quantization_config": {"quant_method": "compressed-tensors",
                                "sparsity_config": Sparse24BitMaskConfig(targets=["fc1", "fc2"]).model_dump()}}))
    with pytest.warns(UserWarning, match="no checksums"):
        loaded = load_24(tmp_path)
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), k


def test_our_bytes_equal_compressed_tensors_bytes_for_full_groups(tmp_path):
    """Where every group holds exactly 2 nonzeros there is one 2:4 layout: the files agree byte for byte."""
    model = TwoFour()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            layer.weight[layer.weight == 0] = 0  # (no -0.0)
    assert all(((m.weight != 0).reshape(-1, 4).sum(-1) == 2).all() for m in (model.fc1, model.fc2))
    save_24(model, tmp_path, targets=["fc*"])
    ours = load_file(tmp_path / "model.safetensors")
    theirs = _compressor().compress(model.state_dict(), compression_targets={"fc1", "fc2"})
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


def test_our_config_carries_their_sparsity_config(tmp_path):
    save_24(TwoFour(), tmp_path, targets=["fc*"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc = read_config(tmp_path)["sparsity_config"]
    parsed = Sparse24BitMaskConfig(**sc)
    assert parsed.format == "sparse-24-bitmask" and parsed.sparsity_structure == "2:4"
    assert parsed.targets == ["fc1", "fc2"]
