"""``meta_clone`` copies a module's attributes as ``copy.deepcopy`` would, tensors on ``meta``."""

import copy

import torch
from torch import nn

from prunable.copies import meta_clone


class _Padded(nn.Linear):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__(2, 2)
        self.sizes, self.shape, self.mixed = sizes, (2, 3), [1, torch.ones(2)]


def test_lists_and_tuples_of_sizes_are_copied_as_deepcopy_copies_them():
    shared = [1, 2, 3]
    model = nn.Sequential(_Padded(shared), _Padded(shared))
    clone, deep = meta_clone(model), copy.deepcopy(model)
    for copied in (clone, deep):
        assert copied[0].sizes == [1, 2, 3] and copied[0].sizes is not shared
        assert copied[0].sizes is copied[1].sizes  # one list in the model, one list in the copy
        assert copied[0].shape is model[0].shape  # a tuple of ints is itself
    clone[0].sizes.append(4)
    assert shared == [1, 2, 3]
    assert clone[0].mixed[0] == 1 and clone[0].mixed[1].is_meta and not model[0].mixed[1].is_meta


class _Tagged(nn.Linear):
    """A subclass with its own copy protocol, next to its base class in one model."""

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.__dict__ = copy.deepcopy(self.__dict__, memo)
        new.tagged = True
        return new


def test_each_class_keeps_its_own_copy_protocol():
    model = nn.Sequential(nn.Linear(2, 2), _Tagged(2, 2), nn.Linear(2, 2), _Tagged(2, 2))
    clone = meta_clone(model)
    assert [getattr(m, "tagged", False) for m in clone] == [False, True, False, True]
    assert all(m.weight.is_meta and m.weight is not n.weight for m, n in zip(clone, model))
