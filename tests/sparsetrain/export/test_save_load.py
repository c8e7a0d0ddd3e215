import json
import warnings

import pytest
import torch
from torch import nn

from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.export import load_24, save_24
from sparsetrain.nm import nm_exact

from .conftest import TwoFour


def _equal_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                                                     b.view(-1).view(torch.uint8) if b.numel() else b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_identical_with_identical_outputs(tmp_path, dtype):
    model = TwoFour(dtype)
    with pytest.warns(UserWarning, match="cannot take 2:4.*tail"):
        out = save_24(model, tmp_path, targets=["fc*", "tail"])
    assert out.targets == ("fc1", "fc2") and out.dense_layers == ("tail",)
    state = load_24(tmp_path)
    ref = model.state_dict()
    assert list(state) == list(ref)
    assert all(_equal_bits(state[k].contiguous(), ref[k].contiguous()) for k in ref)
    fresh = TwoFour(dtype)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert load_24(fresh, tmp_path) is fresh
    x = torch.randn(5, 16).to(dtype)
    assert torch.equal(fresh(x), model(x))
    cfg = json.loads((tmp_path / "config.json").read_text())
    sc = cfg["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    assert sc["targets"] == ["fc1", "fc2"] and sc["ignore"] == ["tail"]
    assert cfg["dtype"] == str(dtype)[6:] and cfg["version"] == 1
    assert cfg["model_class"].endswith("TwoFour")
    floats = [t for t in ref.values() if t.is_floating_point()]
    zeros = sum(t.numel() - int(torch.count_nonzero(t)) for t in floats)
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(t.numel() for t in floats))
    stored = {n for n in cfg["tensors"]}
    assert {"fc1.compressed", "fc1.bitmask", "fc1.shape", "tail.weight", "odd.weight", "scale"} <= stored
    assert "fc1.weight" not in stored


def test_dtype_casts_and_sizes(tmp_path):
    model = TwoFour()
    out = save_24(model, tmp_path, targets=["fc*"], dtype=torch.bfloat16)
    state = load_24(tmp_path)
    assert state["fc1.weight"].dtype == torch.bfloat16 and state["scale"].dtype == torch.bfloat16
    assert torch.equal(state["fc1.weight"], model.fc1.weight.to(torch.bfloat16))
    dense = sum(m.weight.numel() * 2 for m in (model.fc1, model.fc2))
    assert out.sparse_dense_bytes == dense
    # values: half the entries; bitmask: one bit each; shape: 2 int64 per layer
    assert out.sparse_bytes == dense // 2 + sum(m.weight.numel() // 8 for m in (model.fc1, model.fc2)) + 2 * 16
    assert out.sparse_bytes / out.sparse_dense_bytes <= 0.57 + 32 / dense


def test_not_24_is_an_error_naming_layer_and_group_and_ignore_stores_it_dense(tmp_path):
    model = TwoFour()
    with torch.no_grad():
        model.fc2.weight[3, 8:12] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"fc2 is not 2:4: row 3, group 2 \(columns 8-11\)"):
        save_24(model, tmp_path, targets=["fc*"])
    assert list(tmp_path.iterdir()) == []  # nothing written
    out = save_24(model, tmp_path, targets=["fc*"], ignore=["fc2"], overwrite=True)
    assert out.targets == ("fc1",) and out.dense_layers == ("fc2",)
    assert torch.equal(load_24(tmp_path)["fc2.weight"], model.fc2.weight)


def test_a_refused_export_leaves_the_previous_one_intact(tmp_path):
    model = TwoFour()
    save_24(model, tmp_path, targets=["fc*"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.fc1.weight[0, :4] = 1.0
    with pytest.raises(ValueError, match="fc1 is not 2:4"):
        save_24(model, tmp_path, targets=["fc*"], overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with torch.no_grad():
        model.fc1.weight[0, :4] = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match="fc1: the weight holds NaN or inf"):
        save_24(model, tmp_path, targets=["fc*"], overwrite=True)


def test_default_targets_of_a_model_are_its_linears(tmp_path):
    model = TwoFour()
    with pytest.raises(ValueError, match="odd is not 2:4"), pytest.warns(UserWarning, match="tail"):
        save_24(model, tmp_path)
    with pytest.warns(UserWarning, match="stored dense: tail"):
        out = save_24(model, tmp_path, ignore=["odd"])
    assert out.targets == ("fc1", "fc2") and set(out.dense_layers) == {"odd", "tail"}


def test_state_dict_input_and_masks(tmp_path):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4))
    masks = {"0.weight": torch.tensor([[True, False, True, False]] * 8).reshape(4, 8)}
    out = save_24(lin.state_dict(), tmp_path, masks=masks)
    assert out.targets == ("0",)
    state = load_24(tmp_path)
    assert torch.equal(state["0.weight"], nm_exact(lin[0].weight, 2, 4, masks["0.weight"]))
    assert torch.equal(state["2.weight"], lin[2].weight)


@pytest.mark.parametrize("max_shard_bytes", [1, 600, 2000])
def test_sharded_round_trip(tmp_path, max_shard_bytes):
    model = TwoFour()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = save_24(model, tmp_path, targets=["fc*"], max_shard_bytes=max_shard_bytes)
    shards = [f for f in out.files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in out.files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert index["weight_map"] == {n: t["file"] for n, t in cfg["tensors"].items()}
    # a 2:4 weight's three tensors stay in one file
    assert len({index["weight_map"][f"fc1.{p}"] for p in ("compressed", "bitmask", "shape")}) == 1
    state = load_24(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_overwrite_replaces_a_previous_sharded_export(tmp_path):
    model = TwoFour()
    save_24(model, tmp_path, targets=["fc*"], max_shard_bytes=1)
    with pytest.raises(ValueError, match="already holds an export"):
        save_24(model, tmp_path, targets=["fc*"])
    save_24(model, tmp_path, targets=["fc*"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_gpt_with_tied_embedding(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64))
    with torch.no_grad():
        for layer in (model.blocks[0].mlp.fc_in, model.blocks[0].mlp.fc_out):
            layer.weight.copy_(nm_exact(layer.weight, 2, 4))
    out = save_24(model, tmp_path, targets=["*.mlp.*"])
    assert out.targets == ("blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out")
    plain = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64))
    load_24(plain, tmp_path)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(ignore="fc1"), "`ignore` must be a list"),
    (dict(targets=[""]), "`targets` entries"),
    (dict(dtype=torch.int8), "`dtype` must be"),
    (dict(max_shard_bytes=0), "`max_shard_bytes`"),
    (dict(targets=["nothing*"]), "`targets`.*matches no layer"),
    (dict(masks={"fc9.weight": torch.ones(2, 4, dtype=torch.bool)}), "`masks` names 'fc9.weight'"),
    (dict(recipe=[1]), "`recipe`"),
])
def test_save_validates_arguments(tmp_path, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        save_24(TwoFour(), tmp_path, **kwargs)


def test_save_refuses_non_models(tmp_path):
    with pytest.raises(TypeError, match="`model_or_state_dict`"):
        save_24([1, 2], tmp_path)
    with pytest.raises(TypeError, match="must map names to tensors"):
        save_24({"a": 1}, tmp_path)


def test_load_validates_arguments(tmp_path):
    with pytest.raises(TypeError, match="`dirpath` is required"):
        load_24(TwoFour())
    with pytest.raises(ValueError, match="`device` must be"):
        load_24(tmp_path, device="meta")
    with pytest.raises(ValueError, match="needs the model"):
        load_24(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="no config.json"):
        load_24(tmp_path)


def test_load_into_a_model_that_does_not_fit(tmp_path):
    save_24(TwoFour(), tmp_path, targets=["fc*"])
    with pytest.raises(ValueError, match="does not fit Linear: the model has 'weight', which the export lacks"):
        load_24(nn.Linear(16, 32), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_device_without_runtime_is_a_clear_error(tmp_path, monkeypatch):
    save_24(TwoFour(), tmp_path, targets=["fc*"])
    import sys

    monkeypatch.setitem(sys.modules, "sparsetrain.runtime", None)  # the import fails
    with pytest.raises(RuntimeError, match="sparsetrain.runtime.sparsify_model"):
        load_24(TwoFour(), tmp_path, device="cuda")


def _runtime_available():
    try:
        import sparsetrain.runtime  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not _runtime_available(), reason="needs sparsetrain.runtime")
def test_load_on_cuda_runs_the_24_runtime_within_bf16_tolerance(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=4, d_model=256)
    model = GPT(cfg)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".mlp." in name:
                mod.weight.copy_(nm_exact(mod.weight, 2, 4))
    save_24(model, tmp_path, targets=["*.mlp.*"], dtype=torch.bfloat16)
    dense = GPT(cfg).to(torch.bfloat16)
    load_24(dense, tmp_path)
    dense = dense.cuda().eval()
    sparse = load_24(GPT(cfg).to(torch.bfloat16), tmp_path, device="cuda").eval()
    x = torch.randint(0, 256, (4, 64), device="cuda")
    with torch.no_grad():
        ref, out = dense(x).float(), sparse(x).float()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=2e-2)
