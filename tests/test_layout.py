"""KV layout: planes for both vLLM layouts, run coalescing, and descriptor pairing."""

import pytest
import torch

from disagg.transfer.nixl.layout import Run, coalesce, descriptors, planes_of, storage_regions


def test_coalesce_merges_runs_consecutive_on_both_sides():
    assert coalesce([4, 5, 6, 9], [10, 11, 12, 13]) == [Run(4, 10, 3), Run(9, 13, 1)]
    assert coalesce([1, 2], [7, 9]) == [Run(1, 7, 1), Run(2, 9, 1)]
    assert coalesce([], []) == []
    with pytest.raises(ValueError):
        coalesce([1], [])


def test_cpu_layout_one_plane_per_layer():
    t = torch.zeros(8, 2, 16, 2 * 32, dtype=torch.bfloat16)  # [blocks, heads, bs, 2*hd]
    (p,) = planes_of(t, 8)
    assert p.block_bytes == p.block_stride == 2 * 16 * 64 * 2
    assert p.base == t.data_ptr() and p.contiguous


def test_cuda_layout_two_planes_per_layer():
    t = torch.zeros(2, 8, 16, 2, 32, dtype=torch.float16)  # [K/V, blocks, bs, heads, hd]
    k, v = planes_of(t, 8)
    assert k.base == t[0].data_ptr() and v.base == t[1].data_ptr()
    assert k.block_bytes == 16 * 2 * 32 * 2


def test_unsupported_layout_is_refused():
    with pytest.raises(ValueError, match="block dimension"):
        planes_of(torch.zeros(3, 5, 7), 8)


def test_descriptors_address_the_right_bytes():
    t = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)
    planes = planes_of(t, 8)
    runs = coalesce([2, 3, 6], [0, 1, 5])
    local = descriptors(planes, runs, "local")
    remote = descriptors(planes, runs, "remote")
    assert [d[1] for d in local] == [d[1] for d in remote] == [32, 16]
    assert local[0][0] == t[2].data_ptr() and remote[1][0] == t[5].data_ptr()


def test_shared_storage_registered_once():
    big = torch.zeros(4, 8, 16)
    assert len(storage_regions([big[0], big[1], big[2]])) == 1
    assert len(storage_regions([torch.zeros(2), torch.zeros(2)])) == 2
