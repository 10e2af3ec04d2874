"""Prune while Lightning trains: a :class:`PruningCallback` for ``lightning.Trainer``.

The callback builds a :class:`~prunable.Pruner` on the LightningModule (or one of
its submodules) when training starts, collects importance inside the module's
own training steps (forward and backward run by Lightning, between
``on_train_batch_start`` and ``on_train_batch_end``), and removes channels
between steps or epochs until the FLOPs of ``example_inputs`` are at most
``flops`` times what they were. The optimizer's state (momentum, Adam moments)
is sliced with the parameters, which stay the same objects, so the optimizer
and its LR scheduler keep working.

Lightning is an optional dependency (``pip install prunable[lightning]``);
``import prunable`` never imports it, this module does.

Example
-------
::

    import lightning, torch
    from prunable.lightning import PruningCallback

    callback = PruningCallback(flops=0.5, example_inputs=torch.randn(2, 3, 32, 32), every_n_epochs=1)
    lightning.Trainer(max_epochs=10, callbacks=[callback]).fit(module, loader)
    print(callback.history[-1])        # {'epoch': ..., 'step': ..., 'removed': ..., 'flops': 0.49...}

Under a multi-process strategy (DDP), every rank would have to prune the same
channels and re-wrap the model: not supported by this callback yet, it refuses
with a clear error (see ``docs/howto/ddp.md`` for the manual recipe).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import PruningValueError
from .flops import count_flops
from .importance import Criterion
from .pruner import Pruner
from .restore import model_device, module_kinds, shrink_to, size_attributes

try:
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as _pl
    except ImportError as exc:
        raise ImportError("prunable.lightning needs Lightning: pip install 'prunable[lightning]'") from exc

__all__ = ["PruningCallback", "shrink_to_checkpoint"]


class PruningCallback(_pl.Callback):
    """Prune a LightningModule toward a FLOPs target while it trains.

    Parameters
    ----------
    flops
        Target FLOPs as a fraction in (0, 1] of the model's FLOPs when training starts.
    example_inputs
        Inputs of one forward pass of the pruned module (a tensor or a tuple), on any
        device: they are moved to the module's device.
    criterion
        A criterion or its name (``"taylor"``, ``"l1"`` …); data-driven criteria are
        estimated inside the training steps.
    every_n_steps, every_n_epochs
        Prune after every ``n`` training batches, or at the end of every ``n``
        epochs (give exactly one; the default is every epoch).
    amount
        Channels removed per pruning: a count, or a fraction of those left.
    module
        Dotted name of the submodule to prune (e.g. ``"model"``); the
        LightningModule itself when None (its ``forward`` must take ``example_inputs``).
    ignored_layers, min_channels, round_to
        As for :class:`~prunable.Pruner`.

    Attributes
    ----------
    pruner : Pruner or None
        Built when training starts.
    history : list[dict]
        One record per pruning: epoch, step, channels removed, FLOPs as a fraction of the start.
    done : bool
        True once the target is reached (or nothing is left to prune).

    Example
    -------
    >>> callback = PruningCallback(flops=0.5, example_inputs=torch.zeros(1, 3, 8, 8), every_n_steps=10)
    >>> callback.every_n_steps, callback.done
    (10, False)
    """

    def __init__(
        self, *, flops: float, example_inputs: Any, criterion: Criterion | str = "taylor",
        every_n_steps: int | None = None, every_n_epochs: int | None = None, amount: int | float = 0.05,
        module: str | None = None, ignored_layers: Iterable[nn.Module | str] = (), min_channels: int = 1,
        round_to: int | None = None,
    ) -> None:
        if not isinstance(flops, (int, float)) or not 0 < flops <= 1:
            raise PruningValueError(f"flops must be a fraction in (0, 1], got {flops!r}")
        if every_n_steps is not None and every_n_epochs is not None:
            raise PruningValueError("give every_n_steps or every_n_epochs, not both")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PruningValueError(f"{name} must be a positive int, got {value!r}")
        self.target, self.example_inputs, self.criterion = float(flops), example_inputs, criterion
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None or every_n_steps is not None else 1
        self.amount, self.module_name = amount, module
        self.options = {"ignored_layers": tuple(ignored_layers), "min_channels": min_channels, "round_to": round_to}
        self.pruner: Pruner | None = None
        self.history: list[dict[str, float]] = []
        self.done = False
        self._start_flops = 0
        self._batches = 0
        self._seen = 0  # batches estimated since the last pruning
        self._estimating: contextlib.ExitStack | None = None  # open while a training batch is estimated

    # -- Lightning hooks -------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if getattr(trainer, "world_size", 1) > 1:
            raise PruningValueError(
                f"PruningCallback runs on one device; this Trainer has {trainer.world_size} processes "
                "(prune between runs instead: docs/howto/ddp.md)")
        if len(trainer.optimizers) > 1:
            raise PruningValueError(f"PruningCallback handles one optimizer; the module has {len(trainer.optimizers)}")
        target = pl_module.get_submodule(self.module_name) if self.module_name else pl_module
        device = model_device(target)
        self.example_inputs = _to(self.example_inputs, device)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        # built at every fit(): a second fit on the same module has a new optimizer
        self.pruner = Pruner(target, self.example_inputs, criterion=self.criterion, optimizer=optimizer,
                             **self.options)
        self._start_flops = self._start_flops or self._flops()  # kept from a checkpoint when resuming

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        if self.pruner is not None and not self.done and self._needs_data():
            self._estimating = contextlib.ExitStack()
            self._estimating.enter_context(self.pruner.estimate())

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._estimating is not None:
            self._stop_estimating()
            self._seen += 1
        self._batches += 1
        if self.every_n_steps is not None and self._batches % self.every_n_steps == 0:
            self._prune(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._prune(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._stop_estimating()  # never leave the hooks behind

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._stop_estimating()

    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Record the module's sizes, so that :func:`shrink_to_checkpoint` can shrink a fresh module."""
        state = pl_module.state_dict()
        checkpoint["prunable"] = {
            "sizes": size_attributes(pl_module), "modules": module_kinds(pl_module),
            "buffers": {k: v.detach().cpu() for k, v in pl_module.named_buffers() if k not in state}}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "done": self.done, "start_flops": self._start_flops}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.done, self._start_flops = bool(state_dict["done"]), int(state_dict["start_flops"])

    # -- pruning ---------------------------------------------------------------
    def _needs_data(self) -> bool:
        criterion = self.pruner.criterion
        return bool(criterion.needs_grad or criterion.needs_activations)

    def _stop_estimating(self) -> None:
        if self._estimating is not None:
            stack, self._estimating = self._estimating, None
            stack.close()

    def _flops(self) -> int:
        was_training = self.pruner.model.training
        try:
            self.pruner.model.eval()
            return count_flops(self.pruner.model, self.example_inputs)
        finally:
            self.pruner.model.train(was_training)

    def _prune(self, trainer: Any, pl_module: nn.Module) -> None:
        """One pruning step toward the target, between two training steps."""
        if self.pruner is None or self.done or (self._needs_data() and self._seen == 0):
            return
        try:
            plan = self.pruner.step(self.amount)
        except PruningValueError:  # every group is at its minimum
            self.done = True
            return
        self._seen = 0
        ratio = self._flops() / max(self._start_flops, 1)
        self.done = ratio <= self.target
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "removed": len(plan), "flops": ratio}
        self.history.append(record)
        if getattr(trainer, "logger", None) is not None:
            trainer.logger.log_metrics({"prunable/flops": ratio, "prunable/removed": len(plan)},
                                       step=trainer.global_step)


def shrink_to_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Shrink a fresh, unpruned LightningModule to the pruned shapes of a checkpoint.

    Call it from the module's ``on_load_checkpoint`` hook: Lightning calls that hook
    before it loads the weights, both in ``Module.load_from_checkpoint(path)`` and
    when ``trainer.fit(..., ckpt_path=path)`` resumes. A checkpoint written without
    :class:`PruningCallback` is left alone.

    Example
    -------
    ::

        class Classifier(lightning.LightningModule):
            def on_load_checkpoint(self, checkpoint):
                prunable.lightning.shrink_to_checkpoint(self, checkpoint)
    """
    saved = checkpoint.get("prunable")
    if saved is None:
        return
    shrink_to(module, checkpoint["state_dict"], saved["sizes"], modules=saved["modules"], buffers=saved["buffers"],
              source="the checkpoint")


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, tuple):
        return tuple(_to(t, device) for t in inputs)
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    return inputs
