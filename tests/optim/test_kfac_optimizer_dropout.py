r"""KFACOptimizer and KFACPreconditioner on models with dropout in training mode.

One step sees one mask per batch: the factor pass on the step's batch replays the generator
state of the step's loss and gradient pass. References: the network with the step's masks
multiplied in by hand (``tests/curvature/test_kfac_dropout.py``), whose step is
:math:`\theta - \mathrm{lr}\,(K + \lambda I)^{-1} g` with ``so.KFAC`` of that network and its
gradient by ``torch.func.grad``. The masks a pass draws are also recorded directly (a wrapper
of ``F.dropout`` that both the module and the graph engine's dropout rule call). The
preconditioner uses the loop's masks for a recorded batch and refuses masks it cannot replay.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.nn import functional as F

import secondorder as so

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "curvature"))
from test_dropout_products import DropNet
from test_kfac_dropout import LOSSES, MODELS, SEED, pair, targets, without_dropout

from secondorder.curvature.layers import reshape as reshape_rules

DT = torch.float64
PLAIN = dict(factor_decay=0.0, factor_every=1, inverse_every=1, kl_clip=None, adapt_damping=False)


def masks_now(name: str, n: int) -> list[Tensor]:
    """The masks the model's forward draws on a batch of ``n`` from the current state."""
    if name == "dropnet":
        one = torch.ones((), dtype=DT)
        return [
            F.dropout(one.expand(n, 6), 0.4, True),
            F.dropout1d(one.expand(n, 2, 3), 0.5, True),
            F.dropout(one.expand(n, 6), 0.3, True),
        ]
    return [F.dropout(torch.ones(s, dtype=DT), p, True) for s, p in MODELS[name][0].specs(n)]


def twin(name: str, model: nn.Module, n: int) -> nn.Module:
    """The fixed-mask network of the masks the next forward pass would draw (state kept)."""
    state = torch.get_rng_state()
    fixed = MODELS[name][0](masks_now(name, n)).to(DT)
    torch.set_rng_state(state)
    fixed.load_state_dict(model.state_dict())
    return fixed


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def gradient(model: nn.Module, loss_fn, X: Tensor, y: Tensor) -> Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
    return torch.cat([g[k].reshape(-1) for k in params])


@pytest.mark.parametrize("engine", ["auto", "autograd"])
@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_is_the_fixed_mask_networks_kfac_step(name, loss, fisher, engine):
    model, _, X = pair(name)
    loss_fn = LOSSES[loss]
    y = targets(loss, model(X))
    lr, lam = 0.7, 0.05
    opt = so.KFACOptimizer(model, loss_fn, lr=lr, damping=lam, fisher=fisher, **PLAIN)
    opt._engine = engine  # the optimizer's choice of the operator's engine
    ref_gen = torch.Generator().manual_seed(0)  # the optimizer's MC generator (rank 0)
    torch.manual_seed(SEED)
    for _ in range(2):  # the second step draws new masks, at new parameters
        fixed = twin(name, model, X.shape[0])
        K = so.KFAC(fixed, loss_fn, (X, y), fisher=fisher, generator=ref_gen)
        expected = flat(model) - lr * (K.inverse(lam) @ gradient(fixed, loss_fn, X, y))
        state = torch.get_rng_state()
        fixed(X)  # (no randomness) where one forward pass leaves the generators:
        torch.set_rng_state(state)
        model(X)
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        opt.step(X, y)
        torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)
        assert torch.equal(torch.get_rng_state(), after)  # one draw per step


@pytest.mark.parametrize("name", ["dropnet", "encoder"])
def test_adaptive_step_with_trial_losses_is_the_fixed_mask_optimizers(name):
    """Loss, gradient, factors and the trial losses of adaptive damping: one mask."""
    model, _, X = pair(name)
    loss_fn = nn.MSELoss()
    y = targets("mse", model(X))
    kw = dict(lr=0.5, damping=1e-2, factor_every=1, inverse_every=1, damping_every=1)
    opt = so.KFACOptimizer(model, loss_fn, **kw)
    torch.manual_seed(SEED)
    for _ in range(2):
        fixed = twin(name, model, X.shape[0])
        ref = so.KFACOptimizer(fixed, loss_fn, **kw)
        ref.load_state_dict(for_twin(opt.state_dict()))
        want = ref.step(X, y)
        loss = opt.step(X, y)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(flat(model), flat(fixed), rtol=1e-10, atol=1e-12)
        assert opt.diagnostics["accepted"] == ref.diagnostics["accepted"]
        assert opt.diagnostics.get("rho") == pytest.approx(ref.diagnostics.get("rho"), rel=1e-8)


def for_twin(state: dict) -> dict:
    """The optimizer's state with the attention blocks named as the twin's Linear modules."""
    names = {"self_attn.in_proj_weight[0:12]": "qkv", "self_attn.out_proj": "out"}
    blocks = state["kfac"]["blocks"]
    state["kfac"]["blocks"] = {names.get(k, k): v for k, v in blocks.items()}
    return state


class _Recorder:
    """Wraps ``F.dropout`` (the module's call and the graph engine's rule) to keep each mask."""

    def __init__(self, monkeypatch) -> None:
        self.masks: list[tuple[str, Tensor]] = []
        original = F.dropout

        def module_call(x, p=0.5, training=True, inplace=False):
            out = original(x, p, training, inplace)
            if training and p > 0:
                self.masks.append(("module", out != 0))
            return out

        def rule_call(x, p=0.5, training=True, inplace=False):
            out = original(x, p, training, inplace)
            self.masks.append(("rule", out != 0))
            return out

        monkeypatch.setattr(F, "dropout", module_call)
        monkeypatch.setitem(reshape_rules._DROPOUT_FUNCTIONS, nn.Dropout, rule_call)


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_loss_gradient_factor_and_trial_passes_draw_one_mask(monkeypatch, engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT)
    X = torch.randn(16, 4, dtype=DT)
    y = torch.randint(0, 3, (16,))
    opt = so.KFACOptimizer(model, nn.CrossEntropyLoss(), lr=0.5, factor_every=1, damping_every=1)
    opt._engine = engine
    rec = _Recorder(monkeypatch)
    steps = []
    for _ in range(2):
        rec.masks.clear()
        opt.step(X, y)
        assert opt.diagnostics["factors_updated"] and "rho" in opt.diagnostics  # a trial pass
        kinds = [k for k, _ in rec.masks]
        # the loss and gradient pass, >= 1 trial loss; the factor pass (graph engine: the rule)
        assert kinds.count("module") >= 3 if engine == "autograd" else "rule" in kinds
        first = rec.masks[0][1]
        for _, mask in rec.masks:
            assert torch.equal(mask, first)
        steps.append(first)
    assert not torch.equal(steps[0], steps[1])  # the next step draws new masks


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_mode_is_the_network_without_dropout(name):
    model, _, X = pair(name)
    plain = without_dropout(name, model)
    model.eval()
    plain.eval()
    loss_fn = nn.MSELoss()
    y = targets("mse", plain(X))
    opt = so.KFACOptimizer(model, loss_fn, lr=0.5, damping=0.05, fisher="exact", **PLAIN)
    ref = so.KFACOptimizer(plain, loss_fn, lr=0.5, damping=0.05, fisher="exact", **PLAIN)
    before = torch.get_rng_state()
    for _ in range(2):
        opt.step(X, y)
        ref.step(X, y)
        torch.testing.assert_close(flat(model), flat(plain), rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------ preconditioner
@pytest.mark.parametrize("name", sorted(MODELS))
def test_preconditioner_uses_the_loops_masks(name):
    model, _, X = pair(name)
    loss_fn = nn.MSELoss()
    y = targets("mse", model(X))
    lam = 0.05
    pre = so.KFACPreconditioner(model, loss_fn, damping=lam, kl_clip=None, fisher="exact")
    torch.manual_seed(SEED)
    fixed = twin(name, model, X.shape[0])  # the masks of the loop's forward pass below
    loss_fn(model(X), y).backward()
    after = torch.get_rng_state()
    pre.step()
    pre.remove()
    assert torch.equal(torch.get_rng_state(), after)  # the loop's generators, untouched
    K = so.KFAC(fixed, loss_fn, (X, y), fisher="exact")
    g = gradient(fixed, loss_fn, X, y)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, K.inverse(lam) @ g, rtol=1e-10, atol=1e-12)


def test_preconditioner_with_a_given_batch_draws_its_own_masks():
    """``pre.step(X, y)``: the factor pass is an operator built on that batch (new masks)."""
    model, _, X = pair("dropnet")
    loss_fn = nn.MSELoss()
    y = targets("mse", model(X))
    pre = so.KFACPreconditioner(model, loss_fn, damping=0.05, kl_clip=None, fisher="exact")
    torch.manual_seed(SEED)
    loop = twin("dropnet", model, X.shape[0])
    loss_fn(model(X), y).backward()
    factors = twin("dropnet", model, X.shape[0])  # drawn from where the loop left them
    pre.step(X, y)
    pre.remove()
    K = so.KFAC(factors, loss_fn, (X, y), fisher="exact")
    g = gradient(loop, loss_fn, X, y)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, K.inverse(0.05) @ g, rtol=1e-10, atol=1e-12)


class KernelDropout(nn.Module):
    """Dropout whose draw depends on the attention kernel flags, as a fused kernel's does.

    Under the library's math kernel it draws its uniforms in another order than in the loop
    (where the fused kernels are enabled): the same number of draws, a different mask.
    """

    def __init__(self, p: float, named: bool) -> None:
        super().__init__()
        if named:
            self.dropout = p
        self.p_ = p

    def forward(self, h: Tensor) -> Tensor:
        if not self.training:
            return h
        if torch._C._get_flash_sdp_enabled():
            u = torch.rand(h.shape[::-1], dtype=h.dtype).T
        else:
            u = torch.rand(h.shape, dtype=h.dtype)
        return h * (u >= self.p_) / (1 - self.p_)


@pytest.mark.parametrize("named", [True, False])
def test_preconditioner_refuses_masks_it_cannot_replay(named):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), KernelDropout(0.3, named), nn.Linear(6, 3))
    model = model.to(DT)
    X, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)
    loss_fn = nn.MSELoss()
    pre = so.KFACPreconditioner(model, loss_fn, fisher="exact")
    loss_fn(model(X), y).backward()
    match = r"2 \(KernelDropout, p=0\.3\)" if named else "a random function"
    with pytest.raises(ValueError, match=rf"KFACPreconditioner.*does not reproduce.*{match}"):
        pre.step()
    pre.remove()


def test_preconditioner_checks_nothing_without_randomness(monkeypatch):
    """No random draw in the loop's pass: no extra forward pass (the check is free)."""
    from secondorder.optim import loop_masks

    torch.manual_seed(0)
    model = DropNet().to(DT).eval()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    calls = []
    monkeypatch.setattr(loop_masks, "FunctionalModel", lambda *a: calls.append(a))
    loss_fn = nn.MSELoss()
    pre = so.KFACPreconditioner(model, loss_fn, fisher="exact")
    loss_fn(model(X), y).backward()
    assert pre.step()["accepted"]
    assert calls == []


class DropBN(nn.Module):
    """Dropout before BatchNorm (training mode): the statistics are those of the masked input."""

    def __init__(self, masks: list[Tensor] | None = None) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.drop = nn.Dropout(0.3)
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = self.drop(h) if self.masks is None else h * self.masks[0]
        return self.b(torch.tanh(self.bn(h)))


def _bn_reference(
    model: nn.Module, X: Tensor, y: Tensor, loss_fn, lam: float, engine: str = "auto"
) -> Tensor:
    """The step -(K + lam)^-1 g of the fixed-mask twin, BatchNorm's batch statistics constant."""
    state = torch.get_rng_state()
    mask = F.dropout(torch.ones(X.shape[0], 6, dtype=DT), 0.3, True)
    fixed = DropBN([mask]).to(DT)  # (its initialisation draws too)
    torch.set_rng_state(state)
    fixed.load_state_dict(model.state_dict())
    probe = copy.deepcopy(fixed).train()  # the gradient at batch statistics, by backward
    g = torch.cat(
        [t.reshape(-1) for t in torch.autograd.grad(loss_fn(probe(X), y), list(probe.parameters()))]
    )
    h = torch.tanh(fixed.a(X)).detach() * mask
    var, mean = torch.var_mean(h, 0, correction=0)
    fixed.bn.running_mean.copy_(mean)
    fixed.bn.running_var.copy_(var)
    K = so.KFAC(fixed.eval(), loss_fn, (X, y), fisher="exact", engine=engine)
    return K.inverse(lam) @ g


def test_batchnorm_after_dropout_takes_the_steps_masked_statistics():
    torch.manual_seed(0)
    model = DropBN().to(DT).train()
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(2))
    loss_fn, lam = nn.CrossEntropyLoss(), 0.1
    opt = so.KFACOptimizer(model, loss_fn, lr=1.0, damping=lam, fisher="exact", **PLAIN)
    torch.manual_seed(SEED)
    for _ in range(2):
        expected = flat(model) - _bn_reference(model, X, y, loss_fn, lam)
        opt.step(X, y)
        torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)


def test_preconditioner_batchnorm_after_dropout_uses_the_loops_masks():
    torch.manual_seed(0)
    model = DropBN().to(DT).train()
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(2))
    loss_fn, lam = nn.CrossEntropyLoss(), 0.1
    pre = so.KFACPreconditioner(model, loss_fn, damping=lam, kl_clip=None, fisher="exact")
    torch.manual_seed(SEED)
    # the recorder's hooks are off during the factor pass: the graph engine serves the model
    # and BatchNorm's parameters get dense exact blocks, as in KFACOptimizer
    want = _bn_reference(model, X, y, loss_fn, lam)
    loss_fn(model(X), y).backward()
    pre.step()
    pre.remove()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_closure_step_uses_the_closures_masks():
    model, _, X = pair("dropnet")
    loss_fn = nn.MSELoss()
    y = targets("mse", model(X))
    lr, lam = 0.7, 0.05
    opt = so.KFACOptimizer(model, loss_fn, lr=lr, damping=lam, fisher="exact", **PLAIN)
    torch.manual_seed(SEED)
    fixed = twin("dropnet", model, X.shape[0])
    K = so.KFAC(fixed, loss_fn, (X, y), fisher="exact")
    expected = flat(model) - lr * (K.inverse(lam) @ gradient(fixed, loss_fn, X, y))
    seen = {}

    def closure():
        loss = loss_fn(model(X), y)
        seen["loss"] = loss.detach()
        return loss

    loss = opt.step(closure)
    torch.testing.assert_close(seen["loss"], loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)


def test_preconditioner_on_a_compiled_loop_replays_its_masks():
    """``aot_eager`` draws with the eager kernels: the loop's masks are replayed, accepted."""
    model, _, X = pair("dropnet")
    loss_fn = nn.MSELoss()
    y = targets("mse", model(X))
    compiled = torch.compile(model, backend="aot_eager")
    pre = so.KFACPreconditioner(compiled, loss_fn, damping=0.05, kl_clip=None, fisher="exact")
    torch.manual_seed(SEED)
    fixed = twin("dropnet", model, X.shape[0])
    loss_fn(compiled(X), y).backward()
    assert pre.step()["accepted"]
    pre.remove()
    K = so.KFAC(fixed, loss_fn, (X, y), fisher="exact")
    g = gradient(fixed, loss_fn, X, y)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, K.inverse(0.05) @ g, rtol=1e-10, atol=1e-12)
