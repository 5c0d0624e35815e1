"""ShardWriter / finalize_shards / parse_size: round trips, size bounds, deterministic names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nemo_export_hooks.exporter.writer import INDEX_NAME, ShardWriter, finalize_shards, parse_size


def _tensors(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
    out = {}
    for i in range(n):
        dt = dtypes[i % len(dtypes)]
        shape = (i % 4 + 1, 7 + i)
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g).to(dt)
        else:
            t = torch.randint(0, 100, shape, generator=g).to(dt)
        out[f"model.layers.{i}.w"] = t
    return out


def _nbytes(t):
    return t.numel() * t.element_size()


def _load_all(directory, files):
    out = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


@pytest.mark.parametrize(
    "value, expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("100KB", 100 * 10**3),
        ("3MiB", 3 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("5 gb", 5 * 10**9),
        ("1234", 1234),
        ("10B", 10),
        (4096, 4096),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("bad", ["", "GB", "5XB", "-5GB", "5 G B", "0", 0, -1, True, 1.5, None, "0.5B"])
def test_parse_size_rejects_and_names_value(bad):
    with pytest.raises(ValueError) as ei:
        parse_size(bad)
    assert repr(bad) in str(ei.value)


def test_round_trip_and_shard_bound(tmp_path):
    tensors = _tensors(12)
    limit = 200
    w = ShardWriter(tmp_path, limit, prefix="rank00000")
    for k, t in tensors.items():
        w.add(k, t)
    key_to_part = w.close()

    assert set(key_to_part) == set(tensors)
    assert w.num_tensors == len(tensors)
    assert w.total_bytes == sum(_nbytes(t) for t in tensors.values())
    assert w.files == [f"rank00000-{k:05d}.safetensors" for k in range(1, len(w.files) + 1)]
    assert len(w.files) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(w.files)  # no temp files left

    for part in w.files:
        with safe_open(str(tmp_path / part), framework="pt") as f:
            keys = list(f.keys())
            assert f.metadata() == {"format": "pt"}
        assert keys and all(key_to_part[k] == part for k in keys)
        size = sum(_nbytes(tensors[k]) for k in keys)
        assert size <= limit or len(keys) == 1, (part, size)

    loaded = _load_all(tmp_path, w.files)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k


def test_greedy_packing_fills_shards(tmp_path):
    # 10 tensors of 40 bytes with a 100-byte limit -> 2 per shard, 5 shards.
    w = ShardWriter(tmp_path, 100, prefix="p")
    for i in range(10):
        w.add(f"t{i}", torch.full((10,), float(i)))
    m = w.close()
    assert len(w.files) == 5
    assert [m[f"t{i}"] for i in range(10)] == [f"p-{k:05d}.safetensors" for k in (1, 1, 2, 2, 3, 3, 4, 4, 5, 5)]


def test_oversize_tensor_goes_alone(tmp_path):
    w = ShardWriter(tmp_path, 100, prefix="p")
    w.add("small0", torch.zeros(5))  # 20 B
    w.add("big", torch.arange(100, dtype=torch.float32))  # 400 B > limit
    w.add("small1", torch.ones(5))
    m = w.close()
    assert m == {"small0": "p-00001.safetensors", "big": "p-00002.safetensors", "small1": "p-00003.safetensors"}
    assert torch.equal(load_file(str(tmp_path / "p-00002.safetensors"))["big"], torch.arange(100, dtype=torch.float32))


def test_memory_bound_buffer_never_exceeds_one_shard(tmp_path):
    limit = 64
    w = ShardWriter(tmp_path, limit, prefix="p")
    for i in range(20):
        w.add(f"t{i}", torch.zeros(i % 5 + 1))
        assert w._buffer_bytes < limit
    w.close()


def test_non_contiguous_views_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t_view = base.t()  # non-contiguous
    q, k = base.chunk(2, dim=0)  # contiguous views of one storage
    w = ShardWriter(tmp_path, 10**6, prefix="p")
    w.add("t", t_view)
    w.add("q", q)
    w.add("k", k)
    w.add("tied_a", base)
    w.add("tied_b", base)  # same tensor under two names (tied weights)
    w.close()
    loaded = load_file(str(tmp_path / "p-00001.safetensors"))
    assert torch.equal(loaded["t"], t_view)
    assert torch.equal(loaded["q"], q) and torch.equal(loaded["k"], k)
    assert torch.equal(loaded["tied_a"], base) and torch.equal(loaded["tied_b"], base)


def test_scalar_and_empty_tensors(tmp_path):
    w = ShardWriter(tmp_path, 1000, prefix="p")
    w.add("scale", torch.tensor(0.5))
    w.add("empty", torch.zeros(0, 3))
    w.close()
    loaded = load_file(str(tmp_path / "p-00001.safetensors"))
    assert loaded["scale"].shape == () and loaded["scale"].item() == 0.5
    assert loaded["empty"].shape == (0, 3)


def test_errors_name_the_input(tmp_path):
    w = ShardWriter(tmp_path, 1000, prefix="p")
    w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'b'.*meta"):
        w.add("b", torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="'c'"):
        w.add("c", [1, 2])
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.add("d", torch.zeros(1))
    with pytest.raises(ValueError, match="max_shard_bytes"):
        ShardWriter(tmp_path, 0, prefix="p")
    with pytest.raises(ValueError, match="prefix"):
        ShardWriter(tmp_path, 10, prefix="../x")
    with pytest.raises(NotADirectoryError, match="nope"):
        ShardWriter(tmp_path / "nope", 10)


def test_empty_writer_writes_nothing(tmp_path):
    w = ShardWriter(tmp_path, 1000, prefix="p")
    assert w.close() == {}
    assert w.files == [] and w.total_bytes == 0 and list(tmp_path.iterdir()) == []


def _write_ranks(directory, per_rank, limit):
    merged, total = {}, 0
    for rank, tensors in per_rank:
        w = ShardWriter(directory, limit, prefix=f"rank{rank:05d}")
        for k, t in tensors.items():
            w.add(k, t)
        merged.update(w.close())
        total += w.total_bytes
    return merged, total


def test_finalize_multi_rank_deterministic_and_complete(tmp_path):
    all_t = _tensors(16, seed=1)
    names = list(all_t)
    r0 = {k: all_t[k] for k in names[:9]}
    r1 = {k: all_t[k] for k in names[9:]}

    indexes = []
    for order, sub in (([(0, r0), (1, r1)], "a"), ([(1, r1), (0, r0)], "b")):
        d = tmp_path / sub
        d.mkdir()
        merged, total = _write_ranks(d, order, 150)
        parts = sorted(set(merged.values()))
        index = finalize_shards(d, merged, total_size=total)
        n = len(parts)
        expected_files = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        assert sorted(p.name for p in d.iterdir()) == sorted(expected_files + [INDEX_NAME])
        # rank 0's parts come first because renaming follows sorted part names
        assert index["weight_map"][names[0]] == expected_files[0]
        assert index["weight_map"][names[-1]] == expected_files[-1]
        assert index["metadata"]["total_size"] == sum(_nbytes(t) for t in all_t.values())
        assert list(index["weight_map"]) == sorted(all_t)
        assert json.loads((d / INDEX_NAME).read_text()) == index

        # every key is in the file the index says, and nowhere else
        for fname in expected_files:
            with safe_open(str(d / fname), framework="pt") as f:
                assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == fname}
        loaded = _load_all(d, expected_files)
        for k, t in all_t.items():
            assert torch.equal(loaded[k], t), k
        indexes.append(index)
    assert indexes[0] == indexes[1]


def test_finalize_single_shard_and_total_from_headers(tmp_path):
    tensors = _tensors(3)
    merged, total = _write_ranks(tmp_path, [(0, tensors)], 10**6)
    index = finalize_shards(tmp_path, merged)  # total_size computed from headers
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert (tmp_path / "model-00001-of-00001.safetensors").is_file()


def test_finalize_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        finalize_shards(tmp_path, {})
    with pytest.raises(FileNotFoundError, match="ghost-00001.safetensors"):
        finalize_shards(tmp_path, {"a": "ghost-00001.safetensors"})
    with pytest.raises(ValueError, match="plain file name"):
        finalize_shards(tmp_path, {"a": "../x.safetensors"})


def test_transformers_loads_finalized_shards(tmp_path):
    """transformers' own sharded loader accepts our names + index (one shard included)."""
    from transformers.modeling_utils import load_sharded_checkpoint  # noqa: F401  (import check)
    from transformers.utils.hub import get_checkpoint_shard_files

    tensors = _tensors(4)
    merged, total = _write_ranks(tmp_path, [(0, tensors)], 10**6)
    finalize_shards(tmp_path, merged, total_size=total)
    files, meta = get_checkpoint_shard_files(str(tmp_path), str(tmp_path / INDEX_NAME))
    assert [p.split("/")[-1] for p in files] == ["model-00001-of-00001.safetensors"]
    assert set(meta["all_checkpoint_keys"]) == set(tensors)
