"""Recurrent layers: hidden units of nn.LSTM / nn.GRU / nn.RNN pruned in every layer and direction."""

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from prunable import Pruner, PruningValueError, SkipKind, SurgeryError, count_flops, module_flops
from prunable.graph import meta_clone
from prunable.meta import MetaShortcuts
from prunable.recurrent import RecurrentHandler
from prunable.surgery import Cut, Role, apply_cuts, handler_for, keep_indices

from conftest import assert_state_equal, state_copy

KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
HIDDEN, FEATURES = 6, 8


class SeqNet(nn.Module):
    """Linear embedding → recurrent layer → Linear head on every step (sequence tagging)."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 **extra) -> None:
        super().__init__()
        self.embed = nn.Linear(5, FEATURES)
        self.rnn = KINDS[kind](FEATURES, HIDDEN, num_layers=layers, bidirectional=bidirectional,
                               batch_first=batch_first, **extra)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def _inputs(model: SeqNet) -> torch.Tensor:
    x = torch.randn(2, 7, 5)
    return x if model.rnn.batch_first else x.transpose(0, 1)


def _gate_rows(rnn: nn.Module, units: list[int]) -> torch.Tensor:
    handler = handler_for(rnn)
    return handler.local_keep(rnn, Role.OUT, "weight_hh_l0", torch.tensor(units))


def _kill_units(model: SeqNet, units: list[int]) -> None:
    """Make hidden ``units`` dead: every weight and bias producing or reading them is zero."""
    rnn, rows = model.rnn, _gate_rows(model.rnn, units)
    cols = torch.tensor(units)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            p[rows] = 0
            if name.startswith("weight_hh"):
                p[:, cols] = 0
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                p[:, cols] = 0
                if p.shape[1] == 2 * HIDDEN:
                    p[:, cols + HIDDEN] = 0
        model.head.weight[:, cols] = 0
        if model.head.in_features == 2 * HIDDEN:
            model.head.weight[:, cols + HIDDEN] = 0


def _zero_removed(model: nn.Module, pruner: Pruner, removals: dict) -> None:
    """In ``model`` (a copy of ``pruner.model``), zero every tensor entry that the plan cuts
    (producer rows through the handlers; consumer and parameter members along their axis)."""
    modules = dict(model.named_modules())
    groups = {g.id: g for g in pruner.graph.groups}
    with torch.no_grad():
        for gid, idx in removals.items():
            removed = groups[gid].classes[torch.as_tensor(idx)]
            for member in groups[gid].members:
                t, hit = member.target, torch.nonzero(torch.isin(member.classes, removed)).flatten()
                module = modules[t.name]
                if not len(hit):
                    continue
                if t.param is not None:
                    getattr(module, t.param).index_fill_(t.axis, hit, 0)
                    continue
                handler = handler_for(module)
                for name, axis in handler.params(module, t.role).items():
                    tensor = getattr(module, name)
                    if isinstance(tensor, nn.Parameter):
                        tensor.index_fill_(axis, handler.local_keep(module, t.role, name, hit), 0)


CASES = list(itertools.product(KINDS, (1, 2), (False, True), (True, False)))


def _id(case) -> str:
    kind, layers, bi, bf = case
    return f"{kind}-{layers}l-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_dead_hidden_units_are_what_l1_removes_and_output_is_unchanged(case):
    kind, layers, bidirectional, batch_first = case
    model = SeqNet(kind, layers, bidirectional, batch_first).eval()
    x = _inputs(model)
    _kill_units(model, [1, 4])
    with torch.no_grad():
        model.embed.weight[3] = 0  # a dead input feature too: the Linear's output, weight_ih_l0's input
        model.embed.bias[3] = 0
        before = model(x)
    pruner = Pruner(model, x, criterion="l1")
    assert "rnn" not in pruner.skipped and "embed" not in pruner.skipped
    plan = pruner.plan(3)
    assert {k: sorted(v) for k, v in plan.removals.items()} == {"embed": [3], "rnn": [1, 4]}
    pruner.prune(plan)
    rnn, d = model.rnn, 2 if bidirectional else 1
    gates = handler_for(rnn).gates
    assert (rnn.hidden_size, rnn.input_size) == (HIDDEN - 2, FEATURES - 1)
    for name, p in rnn.named_parameters():
        rows = gates * (HIDDEN - 2)
        cols = FEATURES - 1 if name.startswith("weight_ih_l0") else d * (HIDDEN - 2) if "ih" in name else HIDDEN - 2
        assert tuple(p.shape) == ((rows, cols) if name.startswith("weight") else (rows,)), name
    assert model.head.in_features == d * (HIDDEN - 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_pruned_equals_zeroed_on_a_random_plan(case):
    kind, layers, bidirectional, batch_first = case
    model = SeqNet(kind, layers, bidirectional, batch_first).eval()
    x = _inputs(model)
    pruner = Pruner(model, x, criterion="random")
    plan = {"rnn": sorted(torch.randperm(HIDDEN)[:3].tolist()), "embed": sorted(torch.randperm(FEATURES)[:2].tolist())}
    reference = copy.deepcopy(model)
    _zero_removed(reference, pruner, plan)
    pruner.prune(plan)
    assert model.rnn.hidden_size == HIDDEN - 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


class CnnLstm(nn.Module):
    """Conv → BN → ReLU → mean over height → sequence along width → LSTM → Linear on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.rnn = nn.LSTM(8, 10, batch_first=True)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(2).permute(0, 2, 1)  # (N, W, C)
        return self.fc(self.rnn(h)[0][:, -1])


def test_cnn_lstm_prunes_both_parts_with_taylor():
    model = CnnLstm()
    x, y = torch.randn(4, 1, 6, 9), torch.randint(0, 4, (4,))
    pruner = Pruner(model, x)
    assert {g.id for g in pruner.groups} == {"conv", "rnn"}
    with pruner.estimate():
        nn.functional.cross_entropy(model(x), y).backward()
    scores = pruner.scores()
    assert scores["rnn"].shape == (10,) and bool(torch.isfinite(scores["rnn"]).all())
    pruner.step(0.3, scope="layer")
    assert model.conv.out_channels < 8 and model.rnn.hidden_size < 10
    assert model.rnn.input_size == model.conv.out_channels == model.bn.num_features
    assert model.fc.in_features == model.rnn.hidden_size
    model.eval()
    reference = copy.deepcopy(model)
    pruner = Pruner(model, x, criterion="l1")
    plan = {"conv": [0, 2], "rnn": [1, 5]}
    _zero_removed(reference, pruner, plan)
    pruner.prune(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    nn.functional.cross_entropy(model(x), y).backward()  # the pruned model still trains


def test_taylor_scores_both_directions_of_a_unit_together():
    model = SeqNet("gru", bidirectional=True)
    x = _inputs(model)
    pruner = Pruner(model, x)
    seen = {}
    model.rnn.register_forward_hook(lambda m, i, o: seen.update(out=o[0]) or o[0].retain_grad())
    with pruner.estimate():
        model(x).square().sum().backward()
    a, g = seen["out"].detach(), seen["out"].grad
    per_example = (a * g).unflatten(-1, (2, HIDDEN)).mean((1, 2)).abs()  # mean over time and direction
    torch.testing.assert_close(pruner.criterion.scores(pruner._points["rnn"]), per_example.mean(0))


@pytest.mark.parametrize("criterion", ["l1", "l2", "random", "taylor-weight", "taylor-bn"])
def test_weight_criteria_score_one_value_per_hidden_unit(criterion):
    model = SeqNet("lstm", layers=2, bidirectional=True)
    x = _inputs(model)
    pruner = Pruner(model, x, criterion=criterion)
    with pruner.estimate():
        model(x).sum().backward()
    assert pruner.scores()["rnn"].shape == (HIDDEN,)
    with torch.no_grad():
        unit = _gate_rows(model.rnn, [2])
        for name, p in model.rnn.named_parameters():
            if name.startswith("weight"):
                p[unit] *= 100  # unit 2's producing rows, every gate, layer and direction
    if criterion in ("l1", "l2"):
        assert int(pruner.scores()["rnn"].argmax()) == 2


def test_proj_size_is_refused_with_its_reason_and_model_unchanged():
    model = SeqNet("lstm", proj_size=4)
    model.head = nn.Linear(4, 3)
    x = _inputs(model)
    pruner = Pruner(model, x, criterion="l1")
    assert "proj_size" in pruner.skipped["rnn"]
    assert "proj_size" in pruner.skipped["embed"]  # its consumer cannot lose inputs either
    state = state_copy(model)
    with pytest.raises(PruningValueError, match="proj_size"):
        pruner.prune({"rnn": [0]})
    with pytest.raises(SurgeryError, match="proj_size"):
        apply_cuts([Cut(model.rnn, Role.OUT, keep_indices(HIDDEN, [0]))])
    assert_state_equal(model, state)
    assert model.rnn.hidden_size == HIDDEN


def test_initial_state_given_as_input_blocks_the_units_with_a_reason():
    class WithState(SeqNet):
        def forward(self, x, h0):
            return self.head(self.rnn(self.embed(x), h0)[0])

    model = WithState("gru")
    pruner = Pruner(model, (torch.randn(2, 7, 5), torch.zeros(1, 2, HIDDEN)), criterion="l1")
    assert "initial state" in pruner.skipped["rnn"]
    assert "embed" not in pruner.skipped


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_learnt_initial_state_and_final_state_follow_the_units(kind):
    class Learnt(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(5, FEATURES)
            self.rnn = KINDS[kind](FEATURES, HIDDEN, num_layers=2, batch_first=True)
            self.h0 = nn.Parameter(torch.randn(2, 1, HIDDEN))
            self.c0 = nn.Parameter(torch.randn(2, 1, HIDDEN))
            self.head = nn.Linear(HIDDEN, 3)

        def forward(self, x):
            h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
            state = (h0, self.c0.expand_as(h0).contiguous()) if kind == "lstm" else h0
            out, final = self.rnn(self.embed(x), state)
            h_n = final[0] if kind == "lstm" else final
            return self.head(h_n[-1]) + self.head(out[:, 0])

    model = Learnt().eval()
    x = torch.randn(2, 7, 5)
    pruner = Pruner(model, x, criterion="l1")
    assert "rnn" not in pruner.skipped
    reference = copy.deepcopy(model)
    _zero_removed(reference, pruner, {"rnn": [0, 3]})
    pruner.prune({"rnn": [0, 3]})
    assert model.h0.shape == (2, 1, HIDDEN - 2)
    assert model.c0.shape == (2, 1, HIDDEN - 2 if kind == "lstm" else HIDDEN)  # unused by the RNN: untouched
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_flat_weights_stay_the_module_parameters_and_state_dict_loads():
    model = SeqNet("lstm", layers=2, bidirectional=True)
    x = _inputs(model)
    params = dict(model.rnn.named_parameters())
    Pruner(model, x, criterion="l1").prune({"rnn": [0, 5], "embed": [1]})
    rnn = model.rnn
    assert all(getattr(rnn, n) is p for n, p in params.items())  # the same Parameter objects
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))
    rnn.flatten_parameters()
    fresh = nn.LSTM(FEATURES - 1, HIDDEN - 2, num_layers=2, bidirectional=True, batch_first=True)
    fresh.load_state_dict(rnn.state_dict())
    h = torch.randn(2, 7, FEATURES - 1)
    torch.testing.assert_close(fresh(h)[0], rnn(h)[0])


def test_packed_sequence_is_refused_with_a_reason():
    class Packed(SeqNet):
        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(self.embed(x), [7, 5], batch_first=True)
            out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            return self.head(out)

    pruner = Pruner(Packed("lstm"), torch.randn(2, 7, 5), criterion="l1")
    assert "packed" in pruner.skipped["rnn"]


def test_handler_is_registered_for_every_recurrent_type():
    for cls in KINDS.values():
        assert isinstance(handler_for(cls(3, 4)), RecurrentHandler)


def test_meta_copy_runs_the_recurrent_kernel_and_checks_its_shapes():
    """Trial prunes run on a meta copy: ``_VF.lstm``'s meta kernel runs and, unlike the CPU
    (mkldnn) kernel, refuses weights of the wrong size, so a bad cut fails the trial."""
    model = SeqNet("lstm", layers=2, bidirectional=True)
    clone = meta_clone(model)
    out = clone(torch.empty(2, 7, 5, device="meta"))
    assert out.is_meta and out.shape == (2, 7, 3)
    apply_cuts([Cut(clone.rnn, None, keep_indices(4 * HIDDEN, [0]), param="weight_hh_l0", axis=0)])
    with pytest.raises(RuntimeError):
        clone(torch.empty(2, 7, 5, device="meta"))


@pytest.mark.parametrize("extra", [{"bias": False}, {"nonlinearity": "relu"}], ids=["no-bias", "relu"])
def test_variants_prune_like_their_zeroed_copy(extra):
    model = SeqNet("rnn" if "nonlinearity" in extra else "lstm", layers=2, bidirectional=True, **extra).eval()
    x = _inputs(model)
    pruner = Pruner(model, x, criterion="l1")
    reference = copy.deepcopy(model)
    _zero_removed(reference, pruner, {"rnn": [2, 3]})
    pruner.prune({"rnn": [2, 3]})
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_norm_after_the_output_is_cut_and_taylor_measured(bidirectional):
    class Normed(SeqNet):
        def __init__(self):
            super().__init__("lstm", bidirectional=bidirectional)
            self.norm = nn.LayerNorm(self.head.in_features)

        def forward(self, x):
            return self.head(self.norm(self.rnn(self.embed(x))[0]))

    model = Normed()
    x = _inputs(model)
    pruner = Pruner(model, x)
    with pruner.estimate():
        model(x).square().sum().backward()
    assert pruner.scores()["rnn"].shape == (HIDDEN,)
    pruner.prune({"rnn": [0]})
    assert model.norm.normalized_shape == ((HIDDEN - 1) * (2 if bidirectional else 1),)
    assert model(x).shape == (2, 7, 3)


def test_encoder_state_feeding_a_decoder_couples_their_units():
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.LSTM(5, HIDDEN, batch_first=True)
            self.dec = nn.LSTM(5, HIDDEN, batch_first=True)
            self.head = nn.Linear(HIDDEN, 3)

        def forward(self, x):
            _, state = self.enc(x)
            return self.head(self.dec(x, state)[0])

    model = Seq2Seq().eval()
    x = torch.randn(2, 7, 5)
    pruner = Pruner(model, x, criterion="l1")
    group = next(g for g in pruner.groups if {"enc", "dec"} <= {m.target.name for m in g.producers})
    reference = copy.deepcopy(model)
    _zero_removed(reference, pruner, {group.id: [1, 2]})
    pruner.prune({group.id: [1, 2]})
    assert model.enc.hidden_size == model.dec.hidden_size == HIDDEN - 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


class _AtenOps(TorchDispatchMode):
    """Records the aten operations run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", [("lstm", 2, True, True), ("gru", 1, False, False), ("rnn", 2, False, True)],
                         ids=["lstm-2l-bi-bf", "gru-1l-uni-tf", "rnn-2l-uni-bf"])
def test_meta_shortcut_gives_the_kernel_shapes_without_running_time_steps(case):
    kind, layers, bidirectional, batch_first = case
    rnn = KINDS[kind](5, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, device="meta")
    x = torch.empty(9, 3, 5, device="meta").transpose(0, 1)  # non-contiguous, like a permuted conv output
    expected = rnn(x)
    with _AtenOps() as seen, MetaShortcuts():
        got = rnn(x)
    flat = lambda out: [out[0], *(out[1] if isinstance(out[1], tuple) else [out[1]])]  # noqa: E731
    assert [(t.shape, t.dtype) for t in flat(got)] == [(t.shape, t.dtype) for t in flat(expected)]
    assert not {"aten.mm", "aten.addmm", "aten.linear", "aten.sigmoid", "aten.tanh"} & set(seen.ops)
    rows = 4 * handler_for(rnn).gates
    for name, shape in (("weight_ih_l0", (rows, 4)), ("weight_hh_l0", (rows, 3))):  # wrong cuts
        good = getattr(rnn, name).data
        getattr(rnn, name).data = torch.empty(shape, device="meta")
        with pytest.raises(RuntimeError), MetaShortcuts():
            rnn(x)
        getattr(rnn, name).data = good
    d = 2 if bidirectional else 1
    for name, p in rnn.named_parameters():  # every weight cut to 3 units, hidden_size left at 4
        cols = 5 if name.startswith("weight_ih_l0") else d * 3 if "ih" in name else 3
        p.data = torch.empty((rows // 4 * 3, cols) if name.startswith("weight") else (rows // 4 * 3,), device="meta")
    with pytest.raises(RuntimeError), MetaShortcuts():
        rnn(x)


@pytest.mark.parametrize("case", [("lstm", 2, True, True), ("gru", 2, False, False), ("rnn", 1, True, True)],
                         ids=["lstm-2l-bi-bf", "gru-2l-uni-tf", "rnn-1l-bi-bf"])
def test_flops_are_counted_from_shapes_exactly_as_the_kernel_counts_them(case):
    kind, layers, bidirectional, batch_first = case
    model = SeqNet(kind, layers, bidirectional, batch_first)
    x = _inputs(model)
    with torch.no_grad(), FlopCounterMode(display=False) as reference:  # every time step of the meta kernel
        meta_clone(model)(x.to("meta"))
    expected = reference.get_flop_counts()
    assert count_flops(model, x) == reference.get_total_flops()
    assert module_flops(model, x)["rnn"] == sum(expected["SeqNet.rnn"].values()) > 0


@pytest.mark.parametrize("literal", [True, False], ids=["literal-size-state", "state-from-hidden_size"])
def test_cell_state_made_with_a_literal_size_skips_the_units_with_a_reason(literal):
    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(5, FEATURES)
            self.cell = nn.GRUCell(FEATURES, HIDDEN)
            self.head = nn.Linear(HIDDEN, 3)

        def forward(self, x):
            h = torch.zeros(x.shape[0], HIDDEN) if literal else x.new_zeros(x.shape[0], self.cell.hidden_size)
            for t in range(x.shape[1]):
                h = self.cell(self.embed(x[:, t]), h)
            return self.head(h)

    model = Looped()
    x = torch.randn(2, 4, 5)
    pruner = Pruner(model, x, criterion="l1")
    if literal:  # after a cut the literal 6 no longer fits: the trial prune says so
        assert pruner.skipped["cell"].kind is SkipKind.TRIAL_FAILED
        return
    pruner.prune({"cell": [0, 2]})
    assert (model.cell.hidden_size, tuple(model.cell.weight_hh.shape)) == (HIDDEN - 2, (3 * (HIDDEN - 2), HIDDEN - 2))
    assert model(x).shape == (2, 3)
def test_unbatched_sequence_prunes_like_its_zeroed_copy():
    model = SeqNet("lstm", layers=2, bidirectional=True).eval()
    x = torch.randn(7, 5)  # (T, features): no batch dim
    pruner = Pruner(model, x, criterion="l1")
    reference = copy.deepcopy(model)
    _zero_removed(reference, pruner, {"rnn": [0, 5], "embed": [2]})
    pruner.prune({"rnn": [0, 5], "embed": [2]})
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
