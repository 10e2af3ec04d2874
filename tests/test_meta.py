"""The shape-only meta shortcuts of ``prunable.meta.call`` give what the real meta kernels give:
same shape, strides and dtype, the same tensor for in-place calls, the same error otherwise."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from prunable.meta import call


def _same(func, *args, **kwargs):
    try:
        expected, error = func(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - compared below
        expected, error = None, str(exc)
    if error is not None:
        with pytest.raises(Exception) as info:
            call(func, args, kwargs)
        assert str(info.value) == error
        return
    got = call(func, args, kwargs)
    assert (got.shape, got.stride(), got.dtype) == (expected.shape, expected.stride(), expected.dtype)
    assert (got is args[0]) == (expected is args[0])


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def test_conv2d():
    for h, k, s, p, d, g, cin, cout, bias in itertools.product(
            [1, 8], [1, 3], [1, 2], [0, 1], [1, 2], [1, 4], [4, 8], [4, 6], [False, True]):
        x, w = _meta(2, cin, h, h + 1), _meta(cout, max(cin // g, 1), k, k)
        _same(torch.conv2d, x, w, _meta(cout) if bias else None, s, p, d, g)


def test_conv2d_keywords_and_string_padding():
    x, w = _meta(1, 8, 9, 9), _meta(8, 1, 3, 3)
    _same(torch.conv2d, x, w, padding=1, groups=8)
    _same(torch.conv2d, x, w, None, 1, "same", 1, 8)
    _same(torch.conv2d, x, _meta(8, 4, 3, 3))  # channel mismatch: the real error


@pytest.mark.parametrize("size", [1, (1, 1), (None, 3), (2, None), [4, 4], (0, 1)])
def test_adaptive_avg_pool2d(size):
    _same(F.adaptive_avg_pool2d, _meta(2, 8, 7, 5), size)
    _same(F.adaptive_avg_pool2d, _meta(8, 7, 5), size)


def test_linear():
    _same(F.linear, _meta(2, 3, 8), _meta(5, 8), _meta(5))
    _same(F.linear, _meta(8), _meta(5, 8))
    _same(F.linear, _meta(2, 7), _meta(5, 8))
    _same(F.linear, _meta(2, 8), _meta(5, 8), _meta(4))


@pytest.mark.parametrize("func,args,kwargs", [
    (F.relu, (), {}), (F.relu, (), {"inplace": True}), (F.relu6, (True,), {}), (F.hardtanh, (0.0, 6.0, True), {}),
    (F.hardtanh, (0.0, 6.0), {}), (F.gelu, (), {}), (F.silu, (), {"inplace": True}), (F.hardswish, (), {}),
    (torch.sigmoid, (), {}), (torch.Tensor.tanh, (), {}),
])
def test_activations(func, args, kwargs):
    _same(func, _meta(2, 4, 5, 5), *args, **kwargs)
    _same(func, _meta(2, 4, 5, 5).permute(0, 2, 3, 1), *args, **kwargs)


@pytest.mark.parametrize("func", [torch.add, torch.Tensor.__add__, torch.Tensor.__rsub__, torch.Tensor.__mul__,
                                  torch.Tensor.__iadd__, torch.Tensor.mul_, torch.Tensor.__truediv__])
def test_arithmetic(func):
    for other in [(1, 4, 1, 1), (4, 5, 5), (1, 3, 1, 1), 2.0, 3]:
        _same(func, _meta(2, 4, 5, 5), _meta(*other) if isinstance(other, tuple) else other)
    _same(func, _meta(1, 4, 1, 1), _meta(2, 4, 5, 5))  # in place: the real error


@pytest.mark.parametrize("c,stats", [(8, 8), (7, 8), (8, 7)])
def test_batch_and_instance_norm_check_their_tensors_like_the_kernel(c, stats):
    x = _meta(2, c, 5, 5)
    mean, var, w, b = _meta(stats), _meta(stats), _meta(stats), _meta(stats)
    _same(F.batch_norm, x, mean, var, w, b, False)
    _same(F.batch_norm, x, mean, var, None, None, True)
    _same(F.batch_norm, x, None, None, w, b, True)
    _same(F.instance_norm, x, None, None, w, b)
    _same(F.instance_norm, x, mean, var, None, None, use_input_stats=False)


@pytest.mark.parametrize("c,groups,affine", [(8, 2, 8), (8, 3, 8), (8, 2, 7), (6, 6, 6)])
def test_group_norm_checks_groups_and_tensors(c, groups, affine):
    _same(F.group_norm, _meta(2, c, 4, 4), groups, _meta(affine), _meta(affine))


@pytest.mark.parametrize("shape,affine", [((8,), (8,)), ((8,), (7,)), ((5, 8), (5, 8)), ((4, 8), (4, 8))])
def test_layer_norm_checks_shape_and_tensors(shape, affine):
    _same(F.layer_norm, _meta(2, 5, 8), shape, _meta(*affine), _meta(*affine))


def test_a_norm_left_at_the_old_width_fails_a_meta_run():
    """Regression (issue 11): the shortcut returned a blank tensor whatever the BatchNorm's width."""
    from torch import nn
    from prunable.meta import MetaShortcuts

    model = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(8)).eval().to("meta")
    with MetaShortcuts(), pytest.raises(RuntimeError, match="running_mean should contain 7 elements not 8"):
        model(_meta(1, 3, 6, 6))


def test_count_flops_on_meta_equals_the_flop_counter_on_the_real_model():
    """Under ``FlopCounterMode`` only FLOP-free operations take a meta shortcut
    (``call(..., counted=True)``): convolutions, ``linear`` and matrix products are still
    counted, so the count equals torch's counter run on the real model."""
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from prunable import count_flops

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.GroupNorm(2, 8), nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16),
                          nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert count_flops(model, x) == counter.get_total_flops() > 0
    assert call(F.linear, (torch.empty(2, 16, device="meta"), torch.empty(4, 16, device="meta")), {},
                counted=True).shape == (2, 4)


def test_meta_clone_keeps_a_table_shared_by_two_modules_shared_and_hook_tables_apart():
    from torch import nn

    from prunable.copies import meta_clone

    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    net[0].cache = net[1].cache = {}  # one registry for both layers, empty for now
    clone = meta_clone(net)
    assert clone[0].cache is clone[1].cache and clone[0].cache is not net[0].cache
    assert clone[0]._forward_hooks is not net[0]._forward_hooks
    assert clone[0]._forward_hooks is not clone[1]._forward_hooks


@pytest.mark.parametrize("func", [torch.cat, torch.concat, torch.concatenate])
def test_cat_gives_the_kernels_shape_strides_dtype_and_errors(func):
    _same(func, [_meta(2, 3, 4), _meta(2, 5, 4)], 1)
    _same(func, [_meta(2, 3, 4), _meta(2, 5, 4)], dim=-2)
    _same(func, [_meta(2, 3), _meta(4, 3), _meta(0, 3)])
    _same(func, (_meta(2, 3),), -1)
    _same(func, [_meta(2, 3), _meta(2, 4)], 0)  # sizes differ off the cat dim: the real error
    _same(func, [_meta(2, 3), _meta(2, 3)], 2)  # dim out of range: the real error
    _same(func, [_meta(2, 3), _meta(0)], 0)  # the legacy empty 1-D part: the real kernel
    _same(func, [_meta(2, 3), _meta(2, 3).half()], 0)  # dtypes promoted by the kernel
    _same(func, [_meta(3, 2).t(), _meta(2, 3)], 0)  # a non-contiguous part: the real kernel


@pytest.mark.parametrize("batch_first,need_weights,average,bias,kdim", list(itertools.product(
    [True, False], [True, False], [True, False], [True, False], [None, 6])))
def test_multi_head_attention_gives_the_kernels_outputs(batch_first, need_weights, average, bias, kdim):
    """``nn.MultiheadAttention`` on meta: the shortcut of ``F.multi_head_attention_forward``
    (packed projection, no masks) gives the real meta run's outputs; anything else runs for real."""
    from torch import nn

    from prunable.meta import MetaShortcuts

    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias, kdim=kdim, vdim=kdim).to("meta")
    q = _meta(*((2, 5) if batch_first else (5, 2)), 8)
    kv = _meta(*((2, 7) if batch_first else (7, 2)), kdim or 8)
    expected = mha(q, kv, kv, need_weights=need_weights, average_attn_weights=average)
    with MetaShortcuts():
        got = mha(q, kv, kv, need_weights=need_weights, average_attn_weights=average)
    for a, b in zip(expected, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)


def test_multi_head_attention_errors_and_masks_run_the_kernel():
    w, out_w = _meta(24, 8), _meta(8, 8)
    q, kv = _meta(5, 2, 8), _meta(7, 3, 8)  # batch sizes differ: the real error
    _same(F.multi_head_attention_forward, q, kv, kv, 8, 2, w, None, None, None, False, 0.0, out_w, None)
    kv = _meta(7, 2, 8)
    _same(F.multi_head_attention_forward, q, kv, kv, 8, 3, w, None, None, None, False, 0.0, out_w, None)
    mask = torch.zeros(5, 7, dtype=torch.bool, device="meta")
    expected = F.multi_head_attention_forward(q, kv, kv, 8, 2, w, None, None, None, False, 0.0, out_w, None,
                                              attn_mask=mask)
    got = call(F.multi_head_attention_forward, (q, kv, kv, 8, 2, w, None, None, None, False, 0.0, out_w, None),
               {"attn_mask": mask})
    assert [t.shape for t in got] == [t.shape for t in expected]


@pytest.mark.parametrize("layout", ["contiguous", "packed", "transposed"])
@pytest.mark.parametrize("kwargs", [{}, {"scale": 0.3}, {"dropout_p": 0.0}, {"is_causal": True}, {"enable_gqa": True}])
def test_scaled_dot_product_attention_gives_the_kernels_output(layout, kwargs):
    """Contiguous, packed (``qkv.reshape(...).permute(...)``, as timm does) and transposed inputs."""
    if layout == "packed":
        q, k, v = _meta(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "transposed":
        q, k, v = (_meta(2, 7, 4, 8).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = _meta(2, 4, 7, 8), _meta(2, 4, 5, 8), _meta(2, 4, 5, 6)
    _same(F.scaled_dot_product_attention, q, k, v, **kwargs)
    _same(F.scaled_dot_product_attention, q.half(), k.half(), v.half(), **kwargs)


def test_scaled_dot_product_attention_errors_and_masks_run_the_kernel():
    q, v = _meta(3, 5, 8), _meta(3, 6, 8)
    _same(F.scaled_dot_product_attention, q, _meta(3, 6, 7), v)  # head sizes differ: the real error
    _same(F.scaled_dot_product_attention, q, _meta(3, 6, 8), _meta(3, 7, 8))  # key and value lengths differ
    _same(F.scaled_dot_product_attention, q, q, q, torch.ones(5, 5, dtype=torch.bool, device="meta"))
    _same(F.scaled_dot_product_attention, _meta(2, 4, 5, 8), _meta(2, 2, 5, 8), _meta(2, 2, 5, 8), enable_gqa=True)
    _same(F.scaled_dot_product_attention, q, q.half(), q)


def test_multi_head_attention_called_with_its_defaults():
    """``need_weights`` and ``average_attn_weights`` left out default to True, as in the kernel."""
    q, kv, w, out_w = _meta(5, 2, 8), _meta(7, 2, 8), _meta(24, 8), _meta(8, 8)
    args = (q, kv, kv, 8, 2, w, None, None, None, False, 0.0, out_w, None)
    expected, got = F.multi_head_attention_forward(*args), call(F.multi_head_attention_forward, args, {})
    assert [(t.shape, t.stride()) for t in got] == [(t.shape, t.stride()) for t in expected]
