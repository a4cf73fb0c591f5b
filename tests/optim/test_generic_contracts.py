"""torch.optim's generic contracts and fault injection, run over every optimizer.

The optimizers and the problem come from ``test_contract.py``: corrupted hyperparameters in
``param_groups``, empty batches, foreign states, non-finite warm starts, a step that raises,
deepcopy/pickle, ``add_param_group``, frozen parameters, ``weights_only`` checkpoints and the
running statistics of BatchNorm in training mode.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from test_contract import IDS, OPTIMIZERS, flat_params, make_opt, make_problem
from torch import nn

import secondorder as so

DT = torch.float64


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ hyperparameters
CORRUPTIONS = [
    ("lr", math.nan),
    ("lr", -0.5),
    ("lr", math.inf),
    ("lr", 0.0),
    ("damping", -1e-3),
    ("damping", math.nan),
    ("cg_maxiter", 0),
    ("cg_maxiter", 2.5),
    ("cg_rtol", -1.0),
    ("weight_decay", -0.1),
    ("weight_decay", math.nan),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", math.inf),
    ("momentum", 1.0),
    ("momentum", -0.5),
]


@pytest.mark.parametrize("key, value", CORRUPTIONS, ids=[f"{k}={v}" for k, v in CORRUPTIONS])
@pytest.mark.parametrize("name", IDS)
def test_corrupted_hyperparameter_is_refused_before_touching_anything(name, key, value):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    group = opt.param_groups[0]
    if key not in group:
        pytest.skip(f"{OPTIMIZERS[name][0]} has no {key}")
    before, state = _params(model), copy.deepcopy(opt.state_dict())
    group[key] = value
    with pytest.raises(ValueError, match=f"param group 0: Invalid {key} value"):
        opt.step(X, y)
    assert _same(_params(model), before)
    assert opt.global_state["step"] == state["state"][0]["step"]


@pytest.mark.parametrize("name", IDS)
def test_corruption_in_a_later_group_names_it(name):
    model, loss_fn, X, y = make_problem()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = make_opt(name, model, loss_fn, params=groups)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param group 1: Invalid lr value: -1\.0"):
        opt.step(X, y)


@pytest.mark.parametrize("name", IDS)
def test_overflowing_scaled_step_is_rejected(name):
    # lr * d overflows although lr and d are finite: the parameters must stay finite
    model, loss_fn, X, y = make_problem()
    model = model.float()
    # with adaptive damping the trial's infinite loss rejects the step before the guard sees
    # lr * d (tested in test_adaptive_damping.py); here the guard itself is under test
    fixed = {} if OPTIMIZERS[name][0] == "HessianFree" else {"adapt_damping": False}
    opt = make_opt(name, model, loss_fn, **fixed)
    opt.param_groups[0]["lr"] = 3e38  # near float32's largest: lr * d_i overflows for |d_i| > 1.2
    before = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", so.NonFiniteStepWarning)
        opt.step(X.float(), y)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if name in ("newton_cg_hessian", "directional"):  # small directions here: no overflow
        return
    assert opt.diagnostics["accepted"] is False
    assert _same(_params(model), before)
    assert opt.diagnostics["step_norm"] == 0.0
    if name != "hessian_free":  # its line search sees the infinite loss first
        assert opt.diagnostics["rejected_reason"] == "the scaled step lr * d is not finite"


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", IDS)
def test_empty_batch_is_refused(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    before = _params(model)
    with pytest.raises(ValueError, match="holds no samples"):
        opt.step(X[:0], y[:0])
    assert _same(_params(model), before)
    opt.step(X, y)
    assert opt.diagnostics["accepted"]


def test_hessian_free_acc_step_refuses_empty_data():
    model, loss_fn, X, y = make_problem()
    opt = make_opt("hessian_free", model, loss_fn)
    with pytest.raises(ValueError, match=r"loss_data: .*batch 1\b.*no samples"):
        opt.acc_step([(X, y), (X[:0], y[:0])], (X, y), (X, y))
    with pytest.raises(ValueError, match=r"grad_data: .*no samples"):
        opt.acc_step((X, y), (X[:0], y[:0]), (X, y))
    assert "step" not in opt.global_state


def _other_class(name):
    cls = OPTIMIZERS[name][0]
    return "block_newton_ggn" if cls != "BlockDiagonalNewtonCG" else "newton_cg_ggn"


@pytest.mark.parametrize("name", IDS)
def test_state_of_another_class_is_refused(name):
    model, loss_fn, X, y = make_problem()
    other = make_opt(_other_class(name), copy.deepcopy(model), loss_fn)
    other.step(X, y)
    opt = make_opt(name, model, loss_fn)
    with pytest.raises(ValueError, match="load_state_dict: the state is of a"):
        opt.load_state_dict(other.state_dict())
    # without the class name (a foreign or older file): the missing hyperparameters tell
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict(sgd.state_dict())
    opt.step(X, y)
    assert opt.diagnostics["accepted"]


@pytest.mark.parametrize("name", IDS)
def test_state_of_another_model_is_refused(name):
    model, loss_fn, X, y = make_problem()
    wide = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    other = make_opt(name, wide, loss_fn)
    other.step(X, y)
    opt = make_opt(name, model, loss_fn)
    with pytest.raises(ValueError, match=r"shape \(7, 4\) in the state and \(6, 4\) here"):
        opt.load_state_dict(other.state_dict())
    deep = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    other = make_opt(name, deep.to(DT), loss_fn)
    with pytest.raises(ValueError, match="6 parameters, this optimizer's 4"):
        opt.load_state_dict(other.state_dict())
    opt.step(X, y)
    assert opt.diagnostics["accepted"]


# ------------------------------------------------------------- non-finite state
def _warm_start_key(opt):
    for key in type(opt)._WARM_START_KEYS:
        if key in opt.global_state:
            return key
    return None


@pytest.mark.parametrize("name", IDS)
def test_non_finite_warm_start_is_rejected_once_and_reset(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    key = _warm_start_key(opt)
    if key is None:
        pytest.skip("no warm start")
    opt.global_state[key] = torch.full_like(opt.global_state[key], math.nan)
    before = _params(model)
    with pytest.warns(so.NonFiniteStepWarning, match="warm start"):
        opt.step(X, y)
    assert opt.diagnostics["accepted"] is False
    assert "warm start" in opt.diagnostics["rejected_reason"]
    assert _same(_params(model), before)
    assert key not in opt.global_state
    opt.step(X, y)
    assert opt.diagnostics["accepted"] is True


@pytest.mark.parametrize("name", IDS)
def test_non_finite_warm_start_in_a_loaded_state(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    key = _warm_start_key(opt)
    if key is None:
        pytest.skip("no warm start")
    saved = opt.state_dict()
    saved["state"][0][key] = torch.full_like(saved["state"][0][key], math.inf)
    fresh = make_opt(name, model, loss_fn)
    fresh.load_state_dict(saved)
    with pytest.warns(so.NonFiniteStepWarning, match="warm start"):
        fresh.step(X, y)
    fresh.step(X, y)
    assert fresh.diagnostics["accepted"] is True


@pytest.mark.parametrize("name", IDS)
def test_rejected_step_drops_the_warm_start(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    bad = X.clone()
    bad[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", so.NonFiniteStepWarning)
        opt.step(bad, y)
    assert not opt.diagnostics["accepted"]
    assert _warm_start_key(opt) is None


def test_poisoned_damping_state_is_reset_or_refused():
    model, loss_fn, X, y = make_problem()
    opt = make_opt("hessian_free", model, loss_fn)
    opt.step(X, y)
    saved = opt.state_dict()
    saved["state"][0]["damping"] = math.nan
    with pytest.raises(ValueError, match="damping nan"):
        make_opt("hessian_free", model, loss_fn).load_state_dict(saved)
    opt.global_state["damping"] = math.inf  # poisoned in memory
    opt.step(X, y)
    assert opt.diagnostics["damping_reset"] is True
    assert opt.diagnostics["damping"] == opt.param_groups[0]["damping"]
    assert math.isfinite(opt.global_state["damping"])


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("name", IDS)
def test_step_that_raises_is_not_reported_accepted(name, batchnorm):
    model, loss_fn, X, y = make_problem()
    if batchnorm:  # the first forward pass of the step is then the running-statistics one
        model = nn.Sequential(model[0], nn.BatchNorm1d(6).to(DT), model[1], model[2]).train()
    opt = make_opt(
        name,
        model,
        loss_fn,
    )
    opt.step(X, y)
    assert opt.diagnostics["accepted"] is True
    fail = {"on": True}

    def hook(module, args):
        if fail["on"]:
            raise RuntimeError("injected failure")

    handle = model[-1].register_forward_pre_hook(hook)
    stats = _stats(model)
    before = _params(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        opt.step(X, y)
    assert opt.diagnostics["accepted"] is False
    assert "injected failure" in opt.diagnostics["rejected_reason"]
    assert _same(_params(model), before)
    assert _same(_stats(model), stats)
    handle.remove()
    opt.step(X, y)
    assert opt.diagnostics["accepted"] is True


# ------------------------------------------------------------- copy and pickle
@pytest.mark.parametrize("name", IDS)
def test_deepcopy_of_the_optimizer_trains_a_copy_of_the_model(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    clone = copy.deepcopy(opt)
    before = _params(model)
    clone.step(X, y)
    assert clone.diagnostics["accepted"]
    assert _same(_params(model), before)  # the original model is untouched
    assert clone.model is not model
    assert clone.param_groups[0]["params"][0] is next(clone.model.parameters())
    opt.step(X, y)  # the original goes the same way
    assert _same(_params(model), _params(clone.model))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", IDS)
def test_copied_model_and_optimizer_are_an_independent_pair(name, how):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.model is model2
    assert all(a is b for a, b in zip(opt2.param_groups[0]["params"], model2.parameters()))
    before = _params(model)
    opt2.step(X, y)
    assert opt2.diagnostics["accepted"]
    assert _same(_params(model), before)
    opt.step(X, y)
    assert _same(_params(model), _params(model2))  # the same step, bit for bit


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", IDS)
def test_copy_loads_a_state_saved_before_the_copy(name, how):
    # torch's Optimizer.__setstate__ adds bookkeeping keys to the copy's defaults
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    saved = copy.deepcopy(opt.state_dict())
    opt.step(X, y)
    if how == "deepcopy":
        _, opt2 = copy.deepcopy((model, opt))
    else:
        _, opt2 = pickle.loads(pickle.dumps((model, opt)))
    opt2.load_state_dict(saved)
    opt2.load_state_dict(opt.state_dict())
    opt.load_state_dict(opt2.state_dict())
    opt2.step(X, y)
    assert opt2.diagnostics["accepted"]


@pytest.mark.parametrize("name", ["newton_cg_ggn", "hessian_free", "directional"])
def test_copy_and_pickle_with_an_lr_scheduler_attached(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # wraps opt.step
    opt.step(X, y)
    for model2, opt2 in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        opt2.step(X, y)
        assert opt2.diagnostics["accepted"]
        assert opt2.model is model2


def test_optimizer_with_a_process_group_refuses_to_be_copied():
    model, loss_fn, _, _ = make_problem()
    opt = make_opt("newton_cg_ggn", model, loss_fn)
    opt.process_group = object()  # stands for a group (construction would need a world)
    with pytest.raises(TypeError, match="process_group cannot be copied or pickled"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="process_group cannot be copied or pickled"):
        pickle.dumps(opt)


# ------------------------------------------------ param groups and frozen parameters
@pytest.mark.parametrize("name", IDS)
def test_add_param_group_trains_the_new_parameters(name):
    model, loss_fn, X, y = make_problem()
    reference_model = copy.deepcopy(model)
    first, last = list(model[0].parameters()), list(model[2].parameters())
    opt = make_opt(name, model, loss_fn, params=[{"params": first}])
    opt.add_param_group({"params": last})
    groups = [
        {"params": list(reference_model[0].parameters())},
        {"params": list(reference_model[2].parameters())},
    ]
    reference = make_opt(name, reference_model, loss_fn, params=groups)
    before = _params(model)
    for _ in range(2):
        opt.step(X, y)
        reference.step(X, y)
    assert opt.diagnostics["accepted"]
    after = _params(model)
    assert not torch.equal(after[2], before[2]) and not torch.equal(after[3], before[3])
    assert _same(after, _params(reference_model))


@pytest.mark.parametrize("name", IDS)
def test_add_param_group_refuses_bad_groups(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn, params=list(model[0].parameters()))
    with pytest.raises(ValueError, match="Invalid lr value"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=DT))]})
    assert len(opt.param_groups) == 1
    opt.step(X, y)
    assert opt.diagnostics["accepted"]


@pytest.mark.parametrize("name", IDS)
def test_frozen_parameter_is_skipped(name):
    model, loss_fn, X, y = make_problem()
    reference_model = copy.deepcopy(model)
    opt = make_opt(name, model, loss_fn)
    opt.step(X, y)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    before = _params(model)
    opt.step(X, y)
    assert opt.diagnostics["accepted"]
    after = _params(model)
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(after[1], before[1])
    # the step is the one of the method on the trainable parameters only
    reference = make_opt(name, reference_model, loss_fn)
    reference.step(X, y)
    reference_model[0].weight.requires_grad_(False)
    reference.step(X, y)
    assert _same(after, _params(reference_model))
    # unfrozen again, it trains again
    model[0].weight.requires_grad_(True)
    opt.step(X, y)
    assert not torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize("name", IDS)
def test_every_parameter_frozen_is_refused(name):
    model, loss_fn, X, y = make_problem()
    opt = make_opt(name, model, loss_fn)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter to train"):
        opt.step(X, y)


# --------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", IDS)
def test_weights_only_checkpoint_round_trip(name):
    model, loss_fn, X, y = make_problem()
    batches = [(X[i::2], y[i::2]) for i in range(2)]
    reference_model = copy.deepcopy(model)
    reference = make_opt(name, reference_model, loss_fn)
    for k in range(4):
        reference.step(*batches[k % 2])
    opt = make_opt(name, model, loss_fn)
    for k in range(2):
        opt.step(*batches[k % 2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model = make_problem()[0]
    fresh_model.load_state_dict(saved["model"])
    fresh = make_opt(name, fresh_model, loss_fn)
    fresh.load_state_dict(saved["opt"])
    for k in range(2, 4):
        fresh.step(*batches[k % 2])
    assert torch.equal(flat_params(fresh_model), flat_params(reference_model))


def test_directional_custom_callables_survive_a_checkpoint():
    model, loss_fn, X, y = make_problem()

    def criterion(evals):
        return [evals.numel() - 1]

    opt = so.DirectionalDampedNewton(model, loss_fn, criterion=criterion, damping=0.5)
    opt.step(X, y)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["param_groups"][0]["damping"] == {"constant_damping": 0.5}
    fresh = so.DirectionalDampedNewton(model, loss_fn, criterion=criterion, damping=0.25)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["criterion"] is criterion  # the loading optimizer's own
    assert fresh.param_groups[0]["damping"].delta == 0.5
    fresh.step(X, y)
    assert fresh.diagnostics["accepted"]


# ----------------------------------------------------------- BatchNorm statistics
def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3), nn.BatchNorm1d(3)
    ).to(DT)


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, momentum=None),  # cumulative average: counts every update
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    ).to(DT)


def _bn_data(kind, n=12):
    g = torch.Generator().manual_seed(1)
    shape = (n, 4) if kind == "mlp" else (n, 2, 4, 4)
    return torch.randn(*shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _stats(model):
    return [
        b.detach().clone()
        for name, b in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    ]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", IDS)
def test_batchnorm_running_stats_move_as_one_forward_pass(name, kind):
    model = _bn_mlp() if kind == "mlp" else _bn_cnn()
    model.train()
    X, y = _bn_data(kind)
    loss_fn = nn.CrossEntropyLoss()
    expected_model = copy.deepcopy(model)
    opt = make_opt(name, model, loss_fn)
    for _ in range(2):
        with torch.no_grad():
            expected_model.load_state_dict(model.state_dict())
            expected_model(X)  # one plain forward at the step's starting parameters
        opt.step(X, y)
        assert opt.diagnostics["accepted"], opt.diagnostics.get("rejected_reason")
        for got, want in zip(_stats(model), _stats(expected_model)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", IDS)
def test_rejected_step_leaves_running_stats_alone(name):
    model = _bn_mlp().train()
    X, y = _bn_data("mlp")
    opt = make_opt(name, model, nn.CrossEntropyLoss())
    opt.step(X, y)
    before = _stats(model)
    bad = X.clone()
    bad[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", so.NonFiniteStepWarning)
        opt.step(bad, y)
    assert not opt.diagnostics["accepted"]
    for got, want in zip(_stats(model), before):
        assert torch.equal(got, want)


def test_frozen_running_stats_context_manager():
    from secondorder.curvature.running_stats import frozen_running_stats

    model = _bn_cnn().train()
    X, _ = _bn_data("cnn")
    before = _stats(model)
    with frozen_running_stats(model):
        model(X)
        model(X + 1)
        assert not torch.equal(_stats(model)[0], before[0])
    for got, want in zip(_stats(model), before):
        assert torch.equal(got, want)
    model.eval()  # eval mode: nothing to freeze, nothing moves
    with frozen_running_stats(model) as snapshot:
        model(X)
    assert snapshot == []
