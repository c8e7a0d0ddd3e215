import pytest
import torch
from safetensors.torch import load_file

from sparsetrain.export.files import plan_shards, read_header, write_safetensors


def test_tensors_are_written_one_at_a_time(tmp_path):
    """Tensor i is produced only after tensor i-1 is on disk: one tensor in memory at a time."""
    path = tmp_path / "t.safetensors"
    n, size = 5, 1 << 16  # 64 KiB each: past Python's write buffer
    entries = [(f"t{i}", torch.uint8, (size,)) for i in range(n)]
    seen = []

    def produce():
        for i in range(n):
            tmp = path.with_name(path.name + ".tmp")
            seen.append(tmp.stat().st_size)
            yield torch.full((size,), i, dtype=torch.uint8)

    sums = write_safetensors(path, entries, produce())
    _, start = read_header(path)
    assert seen[0] <= start  # (the header may still sit in the write buffer)
    assert seen[1:] == [start + i * size for i in range(1, n)]
    loaded = load_file(path)
    assert all(torch.equal(loaded[f"t{i}"], torch.full((size,), i, dtype=torch.uint8)) for i in range(n))
    assert len(set(sums.values())) == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float16])
def test_written_files_are_safetensors(tmp_path, dtype):
    t = (torch.randn(3, 5) * 4).to(dtype)
    scalar = torch.tensor(2.5).to(dtype)
    write_safetensors(tmp_path / "a.safetensors", [("w", dtype, (3, 5)), ("s", dtype, ())], iter([t, scalar]))
    loaded = load_file(tmp_path / "a.safetensors")
    assert torch.equal(loaded["w"], t) and torch.equal(loaded["s"], scalar)
    header, start = read_header(tmp_path / "a.safetensors")
    assert set(header) == {"w", "s"} and start % 8 == 0


def test_plan_shards():
    groups = [[("a", torch.uint8, (10,))], [("b", torch.uint8, (10,)), ("c", torch.uint8, (5,))],
              [("d", torch.uint8, (40,))], [("e", torch.uint8, (1,))]]
    assert plan_shards(groups, 30) == [[0, 1], [2], [3]]
    assert plan_shards(groups, 1000) == [[0, 1, 2, 3]]
    assert plan_shards([], 10) == [[]]
