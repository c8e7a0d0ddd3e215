"""Every way an export can be damaged is refused with its own message, naming the tensor."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsetrain.export import load_24, save_24

from .conftest import TwoFour


@pytest.fixture
def export(tmp_path):
    save_24(TwoFour(), tmp_path, targets=["fc*"])
    return tmp_path


def _config(path):
    return json.loads((path / "config.json").read_text())


def _write_config(path, cfg):
    (path / "config.json").write_text(json.dumps(cfg))


def _byte_offset(path, name):
    """Where tensor ``name``'s data starts in model.safetensors."""
    raw = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def _flip(path, name, at=0):
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[_byte_offset(path, name) + at] ^= 0xFF
    f.write_bytes(bytes(raw))


def _replace(path, name, tensor):
    """Rewrite model.safetensors with ``name`` replaced and config.json's record updated to match,
    so that only the check under test can catch it."""
    tensors = load_file(path / "model.safetensors")
    tensors[name] = tensor
    save_file(tensors, path / "model.safetensors")
    cfg = _config(path)
    cfg["tensors"][name]["shape"] = list(tensor.shape)
    cfg["tensors"][name]["sha256"] = hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
    _write_config(path, cfg)


def test_intact_export_loads(export):
    assert torch.equal(load_24(export)["fc1.weight"], TwoFour().fc1.weight)


def test_flipped_bitmask_byte(export):
    _flip(export, "fc2.bitmask", at=3)
    with pytest.raises(ValueError, match=r"checksum mismatch: tensor 'fc2.bitmask' \(the 2:4 bitmask of layer 'fc2'\)"):
        load_24(export)


def test_flipped_value_byte(export):
    _flip(export, "fc1.compressed", at=5)
    with pytest.raises(ValueError, match=r"checksum mismatch: tensor 'fc1.compressed' \(the kept 2:4 values of layer"):
        load_24(export)


def test_checksum_mismatch_of_a_dense_tensor(export):
    cfg = _config(export)
    cfg["tensors"]["odd.weight"]["sha256"] = "0" * 64
    _write_config(export, cfg)
    with pytest.raises(ValueError, match=r"checksum mismatch: tensor 'odd.weight' \(a dense tensor\)"):
        load_24(export)


def test_truncated_file(export):
    f = export / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated: tensor '[\w.]+' needs bytes up to"):
        load_24(export)
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(ValueError, match="truncated: .* not even a safetensors header"):
        load_24(export)


def test_wrong_shape(export):
    cfg = _config(export)
    cfg["tensors"]["fc1.compressed"]["shape"] = [32, 16]
    _write_config(export, cfg)
    with pytest.raises(ValueError, match=r"tensor 'fc1.compressed' .* has shape \[32, 8\] in model.safetensors, "
                                         r"config.json records \[32, 16\]"):
        load_24(export)


def test_dense_shape_that_disagrees_with_the_stored_values(export):
    _replace(export, "fc1.shape", torch.tensor([[32], [32]]))
    with pytest.raises(ValueError, match=r"fc1.compressed has shape \(32, 8\), but fc1.shape \[32, 32\] needs"):
        load_24(export)


def test_three_nonzeros_in_a_group(export):
    bitmask = load_file(export / "model.safetensors")["fc1.bitmask"].clone()
    bitmask[4, 1] = 0b0011_0111  # row 4, columns 8-11 keep three
    _replace(export, "fc1.bitmask", bitmask)
    with pytest.raises(ValueError, match=r"fc1.bitmask keeps 3 entries in row 4, group 2 \(columns 8-11\); 2:4 allows "
                                         "at most 2 nonzeros per group of 4"):
        load_24(export)


def test_missing_tensor(export):
    tensors = load_file(export / "model.safetensors")
    del tensors["fc2.bitmask"]
    save_file(tensors, export / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'fc2.bitmask' \(the 2:4 bitmask of layer 'fc2'\) listed in "
                                         "config.json is missing from model.safetensors"):
        load_24(export)


def test_missing_file(tmp_path):
    out = save_24(TwoFour(), tmp_path, targets=["fc*"], max_shard_bytes=1)
    second = out.files[1]
    (tmp_path / second).unlink()
    with pytest.raises(ValueError, match=rf"missing file {second} .*holds tensor"):
        load_24(tmp_path)


def test_unlisted_tensor(export):
    tensors = load_file(export / "model.safetensors")
    tensors["extra"] = torch.zeros(2)
    save_file(tensors, export / "model.safetensors")
    with pytest.raises(ValueError, match="tensor 'extra' in model.safetensors is not listed in config.json"):
        load_24(export)


def test_wrong_dtype(export):
    cfg = _config(export)
    cfg["tensors"]["scale"]["dtype"] = "float16"
    _write_config(export, cfg)
    with pytest.raises(ValueError, match=r"tensor 'scale' \(a dense tensor\) is stored as F32, config.json records "
                                         "float16"):
        load_24(export)


def test_non_finite_values(export):
    values = load_file(export / "model.safetensors")["fc2.compressed"].clone()
    values[0, 0] = float("nan")
    _replace(export, "fc2.compressed", values)
    with pytest.raises(ValueError, match="tensor 'fc2.compressed' holds NaN or inf"):
        load_24(export)


def test_newer_config_version(export):
    cfg = _config(export)
    cfg["version"] = 2
    _write_config(export, cfg)
    with pytest.raises(ValueError, match="export format version 2, newer than this sparsetrain reads "
                                         r"\(up to 1\): upgrade sparsetrain"):
        load_24(export)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c.update(version="1"), "`version` must be a positive integer"),
    (lambda c: c.update(format="other"), "`format` must be 'sparsetrain-24'"),
    (lambda c: c["sparsity_config"].update(format="dense"), "has no 'sparse-24-bitmask' sparsity_config"),
])
def test_bad_config(export, edit, match):
    cfg = _config(export)
    edit(cfg)
    _write_config(export, cfg)
    with pytest.raises(ValueError, match=match):
        load_24(export)


def test_config_not_json(export):
    (export / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_24(export)
