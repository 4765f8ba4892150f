"""The running batch's growing KV cache: the same keys and values as transformers' DynamicCache through every
operation of a running batch, written in place between reallocations."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dylora_moe.serving.kv_cache import GrowingCache, GrowingLayer, room
from tests.conftest import tiny_llama

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kv(b: int, t: int, seed: int, dtype: torch.dtype = torch.float32,
       device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 2, t, 4, generator=g).to(device, dtype),
            torch.randn(b, 2, t, 4, generator=g).to(device, dtype))  # [B, H, T, D]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_updates_match_dynamic_layer_and_write_in_place(dtype, device):
    mine, ref = GrowingLayer(), DynamicCache().layer_class_to_replicate()
    buffers = []
    for step, t in enumerate([5, 1, 1, 3, *[1] * 60]):
        k, v = kv(3, t, step, dtype, device)
        got, want = mine.update(k, v), ref.update(k, v)
        assert got[0].dtype == dtype and got[0].device == k.device
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if not buffers or mine._buffers[0] is not buffers[-1]:
            buffers.append(mine._buffers[0])
    # 64 updates to 70 columns: a buffer of 5 + 32 columns, then one of 38 + 38 (as much room again)
    assert [b.shape[-2] for b in buffers] == [5 + room(5), 38 + room(38)]


def test_select_trim_and_splice_match_tensor_operations():
    layer = GrowingLayer()
    k, v = kv(4, 6, 0)
    layer.update(k, v)
    layer.update(*kv(4, 1, 1))
    keys, values = layer.keys.clone(), layer.values.clone()
    index = torch.tensor([0, 2, 3])
    layer.batch_select_indices(index)
    assert torch.equal(layer.keys, keys[index]) and torch.equal(layer.values, values[index])
    layer.trim(2)
    assert torch.equal(layer.keys, keys[index][:, :, 2:])
    other = GrowingLayer()
    ok, ov = kv(2, 3, 5)
    other.update(ok, ov)
    layer.splice(other, 5)
    assert layer.keys.shape == (5, 2, 5, 4)
    assert torch.equal(layer.keys[:3], keys[index][:, :, 2:])
    assert torch.equal(layer.keys[3:, :, 2:], ok) and not layer.keys[3:, :, :2].any()  # left-padded with zeros
    buffer = layer._buffers[0]
    step_k, step_v = kv(5, 1, 7)
    layer.update(step_k, step_v)
    assert layer._buffers[0] is buffer  # the splice left room: the step wrote in place
    assert torch.equal(layer.keys[:, :, -1:], step_k) and torch.equal(layer.values[:, :, -1:], step_v)


def test_a_layer_whose_keys_were_replaced_adopts_them():
    layer = GrowingLayer()
    layer.update(*kv(2, 4, 0))
    layer.keys, layer.values = layer.keys[:, :, 1:].clone(), layer.values[:, :, 1:].clone()
    before = layer.keys.clone()
    k, v = kv(2, 1, 1)
    layer.update(k, v)
    assert torch.equal(layer.keys, torch.cat([before, k], dim=2))
    assert layer._buffers[0].shape[-2] == 4 + room(4)


def test_a_model_decodes_the_same_with_either_cache():
    model = tiny_llama().eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, cache in (("dynamic", DynamicCache()), ("growing", GrowingCache())):
        with torch.no_grad():
            out = model(input_ids=ids, cache=cache, use_cache=True)
            steps = [out.logits[:, -1]]
            for _ in range(5):
                nxt = steps[-1].argmax(-1, keepdim=True)
                steps.append(model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1])
        logits[name] = torch.stack(steps)
        if name == "growing":
            assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    torch.testing.assert_close(logits["growing"], logits["dynamic"])


def test_a_layer_never_updated_can_still_have_rows_selected():
    layer = GrowingLayer()  # e.g. a layer whose keys another layer shares
    layer.batch_select_indices(torch.tensor([0]))
    assert not layer.is_initialized


def test_a_reset_layer_starts_over():
    layer = GrowingLayer()
    layer.update(*kv(2, 4, 0))
    layer.reset()
    k, v = kv(3, 2, 1)  # another batch size after the reset
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)
