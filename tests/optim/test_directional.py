"""DirectionalDampedNewton against explicit eigendecompositions of dense GGNs (float64)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import secondorder as so
from secondorder.optim.base import NonFiniteError, NonFiniteStepWarning
from secondorder.optim.directional import (
    ConstantDamping,
    DirectionalDampedNewton,
    TopK,
    constant_damping,
    top_k,
)

DT = torch.float64
N, D_IN, D_HIDDEN, D_OUT = 4, 7, 5, 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def seed_problem(seed: int = 0):
    """Seed 004: three Linear layers, MSE with mean reduction, N=4."""
    torch.manual_seed(seed)
    X, y = torch.rand(N, D_IN, dtype=DT), torch.rand(N, D_OUT, dtype=DT)
    model = nn.Sequential(
        nn.Linear(D_IN, D_HIDDEN), nn.Linear(D_HIDDEN, D_HIDDEN), nn.Linear(D_HIDDEN, D_OUT)
    ).to(DT)
    return model, nn.MSELoss(reduction="mean"), X, y


class Net(nn.Module):
    """Not a Sequential: a small CNN with a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, D_OUT)
        self.skip = nn.Linear(36, D_OUT, bias=False)

    def forward(self, x):
        h = torch.sigmoid(self.conv(x)).flatten(1)
        return self.fc(h) + self.skip(x.flatten(1))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_step(model, loss_fn, X, y, groups):
    """Seed 004's check per group: dense eigh of the GGN block, top-k, -g.e/(lam + delta) e."""
    G = so.GGN(model, loss_fn, (X, y))
    dense, grad = G.to_dense(), G.gradient()
    params = list(model.parameters())
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0).tolist()
    step = torch.zeros_like(grad)
    for members, k, damping in groups:
        idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members])
        evals, evecs = torch.linalg.eigh(dense[idx][:, idx])
        evals, evecs = evals[-k:], evecs[:, -k:]
        delta = damping(evals)
        gammas = grad[idx] @ evecs
        step[idx] = evecs @ (-gammas / (evals + delta))
    return step


@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_seed_004_step(lr):
    model, loss_fn, X, y = seed_problem()
    group = {"params": list(model.parameters()), "criterion": top_k(4), "damping": 1.0}
    opt = DirectionalDampedNewton(model, loss_fn, lr=lr, params=[group])
    expected = reference_step(model, loss_fn, X, y, [(range(6), 4, lambda e: 1.0)])
    before = flat(model)
    with torch.no_grad():
        expected_loss = loss_fn(model(X), y)
    loss = opt.step(X, y)
    assert torch.allclose(loss, expected_loss)  # the loss before the step
    assert rel_err(flat(model) - before, lr * expected) <= 1e-10
    diag = opt.diagnostics
    assert diag["accepted"] and diag["num_dropped"] == [0] and len(diag["evals"][0]) == 4
    assert diag["dampings"] == [[1.0] * 4]
    assert diag["step_norm"] == pytest.approx(lr * expected.norm().item(), rel=1e-10)
    assert rel_err(torch.tensor(diag["lambdas"][0]), torch.tensor(diag["evals"][0])) <= 1e-10


@pytest.mark.parametrize("engine", ["auto", "autograd"])
@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_step_matches_dense_reference(loss_name, red, engine):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.ReLU(), nn.Linear(D_HIDDEN, D_OUT)).to(DT)
    X = torch.randn(6, D_IN, dtype=DT)
    loss_fn, y = {
        "ce": (nn.CrossEntropyLoss(reduction=red), torch.randint(0, D_OUT, (6,))),
        "mse": (nn.MSELoss(reduction=red), torch.randn(6, D_OUT, dtype=DT)),
        "bce": (nn.BCEWithLogitsLoss(reduction=red), torch.randint(0, 2, (6, D_OUT)).to(DT)),
    }[loss_name]
    expected = reference_step(model, loss_fn, X, y, [(range(4), 5, lambda e: 0.1)])
    opt = DirectionalDampedNewton(model, loss_fn, criterion=top_k(5), damping=0.1, engine=engine)
    before = flat(model)
    opt.step(X, y)
    assert rel_err(flat(model) - before, expected) <= 1e-8


def test_non_sequential_module_with_param_groups():
    torch.manual_seed(2)
    model = Net().to(DT)
    X, y = torch.randn(5, 1, 6, 6, dtype=DT), torch.randint(0, D_OUT, (5,))
    loss_fn = nn.CrossEntropyLoss()
    conv, fc, skip = model.conv, model.fc, model.skip
    relative = lambda evals, evecs, gammas, lambdas: 0.5 * evals + 0.01  # noqa: E731
    groups = [
        {"params": [fc.bias, conv.weight, conv.bias], "criterion": top_k(3)},
        {"params": [skip.weight, fc.weight], "criterion": top_k(2), "damping": relative, "lr": 0.5},
    ]
    opt = DirectionalDampedNewton(model, loss_fn, params=groups, damping=0.2)
    # parameter order in the model: conv.weight, conv.bias, fc.weight, fc.bias, skip.weight
    g0 = reference_step(model, loss_fn, X, y, [([0, 1, 3], 3, lambda e: 0.2)])
    g1 = reference_step(model, loss_fn, X, y, [([2, 4], 2, lambda e: 0.5 * e + 0.01)])
    before = flat(model)
    opt.step(X, y)
    assert rel_err(flat(model) - before, g0 + 0.5 * g1) <= 1e-8
    assert [len(e) for e in opt.diagnostics["evals"]] == [3, 2]


def test_damping_sees_per_sample_derivatives():
    model, loss_fn, X, y = seed_problem(3)
    seen = {}

    def recording(evals, evecs, gammas, lambdas):
        seen.update(evals=evals, evecs=evecs, gammas=gammas, lambdas=lambdas)
        return torch.ones_like(evals)

    opt = DirectionalDampedNewton(model, loss_fn, criterion=top_k(3), damping=recording)
    G = so.GGN(model, loss_fn, (X, y))
    dense = G.to_dense()
    opt.step(X, y)
    assert seen["evals"].shape == (3,) and seen["evecs"].shape == (N * D_OUT, 3)
    assert seen["gammas"].shape == (N, 3) and seen["lambdas"].shape == (N, 3)
    assert rel_err(seen["evals"], torch.linalg.eigvalsh(dense)[-3:]) <= 1e-10
    U = seen["evecs"]
    assert rel_err(U.T @ U, torch.eye(3, dtype=DT)) <= 1e-10
    assert rel_err(seen["lambdas"].mean(0), seen["evals"]) <= 1e-10


def test_gammas_and_lambdas_against_dense_per_sample_quantities():
    model, loss_fn, X, y = seed_problem(4)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = flat(model)

    def per_sample_losses(th):
        out = functional_call(
            model, dict(zip(names, [t.view(s) for t, s in zip(th.split(sizes), shapes)])), (X,)
        )
        return ((out - y) ** 2).mean(1)  # loss of each sample alone (mean reduction)

    grads = jacrev(per_sample_losses)(theta)  # (N, P)
    seen = {}

    def recording(evals, evecs, gammas, lambdas):
        seen.update(gammas=gammas, lambdas=lambdas)
        return torch.full_like(evals, 0.5)

    dense = so.GGN(model, loss_fn, (X, y)).to_dense()
    evals, evecs = torch.linalg.eigh(dense)
    E = evecs[:, -3:]
    opt = DirectionalDampedNewton(model, loss_fn, criterion=top_k(3), damping=recording)
    opt.step(X, y)
    sign = torch.sign(seen["gammas"].mean(0) / (grads.mean(0) @ E))
    assert rel_err(seen["gammas"], grads @ E * sign) <= 1e-9
    assert rel_err(seen["lambdas"].mean(0), evals[-3:]) <= 1e-10


def test_zero_eigenvalues_are_dropped():
    torch.manual_seed(0)
    model = nn.Linear(2, D_OUT, bias=False).to(DT)  # P = 6 < D = N * C = 12
    X, y = torch.randn(N, 2, dtype=DT), torch.randn(N, D_OUT, dtype=DT)
    loss_fn = nn.MSELoss()
    opt = DirectionalDampedNewton(model, loss_fn, criterion=top_k(10), damping=1e-3)
    expected = reference_step(model, loss_fn, X, y, [([0], 6, lambda e: 1e-3)])
    before = flat(model)
    opt.step(X, y)
    assert opt.diagnostics["num_dropped"] == [4]
    assert rel_err(flat(model) - before, expected) <= 1e-8


def test_monte_carlo_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT)).to(DT)
    X, y = torch.randn(8, D_IN, dtype=DT), torch.randint(0, D_OUT, (8,))
    loss_fn = nn.CrossEntropyLoss()
    clone = copy.deepcopy(model)
    a = DirectionalDampedNewton(
        model, loss_fn, mc_samples=2, generator=torch.Generator().manual_seed(5), criterion=top_k(4)
    )
    b = DirectionalDampedNewton(
        clone, loss_fn, mc_samples=2, generator=torch.Generator().manual_seed(7), criterion=top_k(4)
    )
    a.step(X, y)
    state = a.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the criterion and damping objects pickle
    buffer.seek(0)
    with torch.no_grad():
        for p, q in zip(clone.parameters(), model.parameters()):
            p.copy_(q)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    a.step(X, y)
    b.step(X, y)
    assert rel_err(flat(clone), flat(model)) <= 1e-14
    assert a.diagnostics["step"] == b.diagnostics["step"] == 2
    assert len(a.diagnostics["evals"][0]) == 4  # the Gram matrix has N * M = 16 columns


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    X = torch.randn(64, 4, dtype=DT)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    opt = DirectionalDampedNewton(model, nn.CrossEntropyLoss(), criterion=top_k(20), damping=0.1)
    losses = [opt.step(X, y).item() for _ in range(15)]
    assert losses[-1] < 0.6 * losses[0]


def test_scheduler_and_empty_selection():
    model, loss_fn, X, y = seed_problem()
    opt = DirectionalDampedNewton(model, loss_fn, criterion=lambda evals: [])
    before = flat(model)
    opt.step(X, y)
    assert torch.equal(flat(model), before) and opt.diagnostics["step_norm"] == 0.0
    opt2 = DirectionalDampedNewton(model, loss_fn, lr=1.0, criterion=top_k(2))
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.step(X, y)
    sched.step()
    assert opt2.param_groups[0]["lr"] == 0.5


def test_non_positive_denominators_are_rejected():
    model, loss_fn, X, y = seed_problem()
    negative = lambda evals, evecs, gammas, lambdas: -evals - 1.0  # noqa: E731
    opt = DirectionalDampedNewton(model, loss_fn, criterion=top_k(2), damping=negative)
    before = flat(model)
    with pytest.warns(NonFiniteStepWarning, match=r"lambda_k \+ delta_k <= 0"):
        opt.step(X, y)
    assert torch.equal(flat(model), before)
    assert not opt.diagnostics["accepted"] and opt.diagnostics["step_norm"] == 0.0
    nan = lambda evals, evecs, gammas, lambdas: evals * float("nan")  # noqa: E731
    strict = DirectionalDampedNewton(model, loss_fn, damping=nan, on_nonfinite="raise")
    with pytest.raises(NonFiniteError, match="damping is not finite"):
        strict.step(X, y)
    assert torch.equal(flat(model), before)
    bad_x = X.clone()
    bad_x[0, 0] = float("inf")
    opt3 = DirectionalDampedNewton(model, loss_fn)
    with pytest.warns(NonFiniteStepWarning, match="not finite"):
        opt3.step(bad_x, y)
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize(
    "criterion, match",
    [
        (lambda evals: [evals.numel()], "outside"),
        (lambda evals: [-1], "outside"),
        (lambda evals: [1, 1], "repeated"),
        (lambda evals: [0.5], "ints"),
        (lambda evals: torch.tensor([0.0]), "integer tensor"),
        (lambda evals: 3, "sequence of ints"),
    ],
)
def test_bad_criterion_output(criterion, match):
    model, loss_fn, X, y = seed_problem()
    opt = DirectionalDampedNewton(model, loss_fn, criterion=criterion)
    with pytest.raises(ValueError, match=match):
        opt.step(X, y)


def test_bad_damping_output_and_arguments():
    model, loss_fn, X, y = seed_problem()
    wrong = lambda evals, evecs, gammas, lambdas: torch.ones(len(evals) + 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
        DirectionalDampedNewton(model, loss_fn, criterion=top_k(2), damping=wrong).step(X, y)
    with pytest.raises(ValueError, match="likelihood"):
        DirectionalDampedNewton(model, lambda z, t: (z - t).abs().mean())
    with pytest.raises(ValueError, match="Invalid lr value"):
        DirectionalDampedNewton(model, loss_fn, lr=0.0)
    with pytest.raises(ValueError, match="Invalid mc_samples value"):
        DirectionalDampedNewton(model, loss_fn, mc_samples=-2)
    with pytest.raises(ValueError, match="Invalid damping value"):
        DirectionalDampedNewton(model, loss_fn, damping=-1.0)
    with pytest.raises(ValueError, match="Invalid k value"):
        top_k(0)
    with pytest.raises(TypeError, match="criterion must be a callable"):
        DirectionalDampedNewton(
            model, loss_fn, params=[{"params": model.parameters(), "criterion": 3}]
        )
    with pytest.raises(TypeError, match="damping must be a number or a callable"):
        DirectionalDampedNewton(model, loss_fn, damping="big")
    with pytest.raises(ValueError, match="engine"):
        DirectionalDampedNewton(model, loss_fn, engine="fast")
    assert isinstance(top_k(3), TopK) and repr(top_k(3)) == "top_k(3)"
    assert isinstance(constant_damping(0.5), ConstantDamping)


def wide_problem(loss_name: str = "mse"):
    """N = 96 samples: the Gram matrix (D = 288 for MSE, 192 for CE) suits block Krylov."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D_OUT)).to(DT)
    X = torch.randn(96, D_IN, dtype=DT)
    if loss_name == "ce":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, D_OUT, (96,))
    return model, nn.MSELoss(), X, torch.randn(96, D_OUT, dtype=DT)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_krylov_step_equals_full_eigh_step(loss_name):
    model, loss_fn, X, y = wide_problem(loss_name)
    clone = copy.deepcopy(model)
    expected = reference_step(model, loss_fn, X, y, [(range(4), 5, lambda e: 0.1)])
    fast = DirectionalDampedNewton(model, loss_fn, criterion=top_k(5), damping=0.1)
    full = DirectionalDampedNewton(
        clone, loss_fn, criterion=top_k(5), damping=0.1, eigensolver="torch"
    )
    before = flat(model)
    fast.step(X, y)
    full.step(X, y)
    assert fast.diagnostics["eigensolver"] == ["krylov"]
    assert full.diagnostics["eigensolver"] == ["eigh"]
    assert rel_err(flat(model) - before, flat(clone) - before) <= 1e-10
    assert rel_err(flat(model) - before, expected) <= 1e-10
    D = 96 * (D_OUT - 1 if loss_name == "ce" else D_OUT)
    assert fast.diagnostics["indices"] == full.diagnostics["indices"] == [list(range(D - 5, D))]
    for key in ("evals", "gammas", "lambdas"):
        a, b = torch.tensor(fast.diagnostics[key][0]), torch.tensor(full.diagnostics[key][0])
        assert rel_err(a.abs(), b.abs()) <= 1e-10


def test_criteria_with_and_without_num_leading():
    model, loss_fn, X, y = wide_problem()
    seen = {}

    class Leading:
        num_leading = 6

        def __call__(self, evals):
            seen["leading"] = evals.clone()
            return [evals.numel() - 1, evals.numel() - 3]  # positions among the 6 it sees

    def threshold(evals):  # a generic rule needs the whole spectrum
        seen["full"] = evals.clone()
        return (evals > 0.5 * evals[-1]).nonzero().squeeze(1)

    assert top_k(7).num_leading == 7
    dense = so.GGN(model, loss_fn, (X, y)).to_dense()
    exact = torch.linalg.eigvalsh(dense)
    opt = DirectionalDampedNewton(copy.deepcopy(model), loss_fn, criterion=Leading())
    opt.step(X, y)
    D = 96 * D_OUT
    assert seen["leading"].shape == (6,) and rel_err(seen["leading"], exact[-6:]) <= 1e-10
    assert opt.diagnostics["indices"] == [[D - 1, D - 3]]
    assert opt.diagnostics["eigensolver"] == ["krylov"]
    opt = DirectionalDampedNewton(copy.deepcopy(model), loss_fn, criterion=threshold)
    opt.step(X, y)
    assert seen["full"].shape == (D,) and opt.diagnostics["eigensolver"] == ["eigh"]
    chosen = int((exact > 0.5 * exact[-1]).sum())
    assert len(opt.diagnostics["indices"][0]) == chosen
    with pytest.raises(ValueError, match="eigensolver"):
        DirectionalDampedNewton(model, loss_fn, eigensolver="arpack")


@pytest.mark.parametrize("mc_samples", [0, 2])
def test_sequential_cnn_kron_engine_equals_autograd(mc_samples):
    """Seed 001's sigmoid CNN, shrunk: the kron engine's conv columns give autograd's step."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(2, 3, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(3, 4),
        nn.Sigmoid(),
        nn.Linear(4, D_OUT),
    ).to(DT)
    X, y = torch.randn(6, 1, 12, 12, dtype=DT), torch.randint(0, D_OUT, (6,))
    loss_fn = nn.CrossEntropyLoss()
    steps = {}
    for engine in ("kron", "autograd"):
        trial = copy.deepcopy(model)
        opt = DirectionalDampedNewton(
            trial,
            loss_fn,
            params=[
                {"params": [trial[3].weight], "criterion": top_k(3)},
                {"params": [trial[0].bias], "criterion": top_k(1)},
                {
                    "params": [trial[i].weight for i in (0, 7, 9)]
                    + [trial[i].bias for i in (3, 7, 9)],
                    "criterion": top_k(4),
                },
            ],
            damping=0.1,
            mc_samples=mc_samples,
            engine=engine,
        )
        before = flat(trial)
        opt.step(X, y)
        steps[engine] = flat(trial) - before
    assert rel_err(steps["kron"], steps["autograd"]) <= 1e-8
    if mc_samples == 0:  # parameter order: conv1 w, b, conv2 w, b, fc1 w, b, fc2 w, b
        expected = reference_step(
            model,
            loss_fn,
            X,
            y,
            [
                ([2], 3, lambda e: 0.1),
                ([1], 1, lambda e: 0.1),
                ([0, 3, 7, 4, 5, 6], 4, lambda e: 0.1),
            ],
        )
        assert rel_err(steps["kron"], expected) <= 1e-8
