import pytest
import torch

from sparsetrain.runtime import _cslt


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Every test gets its own dispatch-table cache directory."""
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path / "cache"))


def random_24(out_features, in_features, *, dtype=torch.bfloat16, device="cpu", seed=0):
    """A random weight with a random 2:4 pattern (exactly 2 kept per group of 4, some kept values zero)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    keep = torch.rand(out_features, in_features // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(out_features, in_features // 4, 4, dtype=torch.bool).scatter(-1, keep, True)
    return torch.where(mask.reshape(out_features, in_features), w, 0.0).to(device, dtype)


needs_cusparselt = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cslt.available(), reason="needs CUDA with cuSPARSELt"),
]


def gpt_24(cfg, *, seed_by_name=False):
    """The demo GPT of ``cfg`` (torch seed 0) with random 2:4 MLP weights (``random_24`` of seed 0, or of the
    layer name's length), bf16, in eval mode, on the CPU."""
    from torch import nn

    from sparsetrain.demo import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".mlp." in name:
                m.weight.copy_(random_24(*m.weight.shape, dtype=torch.float32, seed=len(name) if seed_by_name else 0))
    return model.to(torch.bfloat16).eval()
