import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import prunable

pl = pytest.importorskip("lightning.pytorch")
from prunable.lightning import PruningCallback  # noqa: E402

# Lightning's own deprecation chatter about torch's pytree API (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)")


class TinyModule(pl.LightningModule):
    """A conv net trained with Adam and a StepLR scheduler."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def _loader(n=32):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(module, callback, epochs=2):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n).*")
        trainer.fit(module, _loader())
    return trainer


def test_taylor_pruning_between_steps_with_adam_and_a_scheduler():
    module = TinyModule()
    x = torch.randn(2, 1, 8, 8)
    start = prunable.count_flops(module.eval(), x)
    module.train()
    callback = PruningCallback(flops=0.6, example_inputs=x, every_n_steps=2, amount=4)
    trainer = _fit(module, callback, epochs=3)
    assert callback.history and callback.done  # Taylor scores came from Lightning's own training steps
    assert prunable.count_flops(module.eval(), x) <= 0.6 * start
    assert module.net[0].out_channels < 16 or module.net[3].out_channels < 16
    assert trainer.global_step == 12 and len(module.losses) == 12  # training went on after each prune
    assert all(torch.isfinite(torch.tensor(module.losses)))
    optimizer = trainer.optimizers[0]
    for param in module.parameters():  # Adam's moments sliced with the parameters
        assert optimizer.state[param]["exp_avg"].shape == param.shape
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    # no hooks left behind: the estimation context is closed after every batch
    assert all(not m._forward_hooks and not m._backward_hooks for m in module.modules())


def test_pruning_at_epoch_ends_with_a_data_free_criterion_on_a_submodule():
    module = TinyModule()
    callback = PruningCallback(flops=0.8, example_inputs=torch.randn(2, 1, 8, 8), criterion="l1",
                               module="net", amount=0.2)
    _fit(module, callback, epochs=3)
    assert [r["epoch"] for r in callback.history] == list(range(len(callback.history)))
    assert callback.history[-1]["flops"] <= 0.8 and callback.done
    assert callback.pruner.model is module.net


@pytest.mark.parametrize("kwargs, needle", [
    ({"flops": 1.5}, "flops"),
    ({"flops": 0.5, "every_n_steps": 2, "every_n_epochs": 1}, "not both"),
    ({"flops": 0.5, "every_n_steps": 0}, "every_n_steps"),
])
def test_bad_options_are_named(kwargs, needle):
    with pytest.raises(prunable.PruningValueError, match=needle):
        PruningCallback(example_inputs=torch.zeros(1), **kwargs)


def test_prunable_imports_without_lightning():
    code = ("import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
            "import prunable\n"
            "try:\n    import prunable.lightning\nexcept ImportError as e:\n    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "refused: prunable.lightning needs Lightning: pip install 'prunable[lightning]'" in run.stdout


class ResumableModule(TinyModule):
    def on_load_checkpoint(self, checkpoint):
        from prunable.lightning import shrink_to_checkpoint

        shrink_to_checkpoint(self, checkpoint)


def test_checkpoints_of_a_pruned_module_load_and_resume(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    module = ResumableModule()
    callback = PruningCallback(flops=0.5, example_inputs=x, criterion="l1", every_n_steps=2, amount=3)
    trainer = _fit(module, callback, epochs=1)
    assert callback.history and not callback.done
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = ResumableModule.load_from_checkpoint(tmp_path / "last.ckpt")  # a fresh module, shrunk, then filled
    assert torch.equal(loaded.eval()(x), module.eval()(x))
    again = PruningCallback(flops=0.5, example_inputs=x, criterion="l1", every_n_steps=2, amount=3)
    resumed = pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[again])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n).*")
        resumed.fit(ResumableModule(), _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert again.history[: len(callback.history)] == callback.history and again.done
    ratios = [r["flops"] for r in again.history]  # measured against the FLOPs before the first run pruned
    assert len(ratios) > len(callback.history) and ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.5
