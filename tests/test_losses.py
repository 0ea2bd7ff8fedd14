"""Per-tick losses against independent torch implementations: value and gradient, float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

import modgrad as mg
from modgrad.losses import (
    AdaptiveExitLoss,
    CtmLoss,
    ImaginationLoss,
    LastTickCE,
    StepwiseCE,
    ThinkingLoss,
    first_min_mask,
    last_max_mask,
    make_loss,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

# float64 on both sides; the two sides differ only by summation order.
TOL = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# torch references, written from the definitions without sharing code with modgrad.losses


def t_tick_ce(preds, targets):
    b, t, c = preds.shape
    flat = F.cross_entropy(preds.reshape(b * t, c), targets.repeat_interleave(t), reduction="none")
    return flat.reshape(b, t)


def t_confidence(preds):
    p = torch.softmax(preds.detach(), -1)
    h = -(p * torch.log(p)).sum(-1)
    return 1.0 - torch.clamp(h / math.log(preds.shape[-1]), 0.0, 1.0)


def t_first_argmin(x):
    return torch.tensor([int(np.flatnonzero(row == row.min())[0]) for row in x.detach().numpy()])


def t_last_argmax(x):
    return torch.tensor([int(np.flatnonzero(row == row.max())[-1]) for row in x.detach().numpy()])


def t_ctm(ce, conf):
    rows = torch.arange(ce.shape[0])
    return 0.5 * (ce[rows, t_first_argmin(ce)] + ce[rows, t_last_argmax(conf)])


def t_ctm_loss(preds, targets):
    return t_ctm(t_tick_ce(preds, targets), t_confidence(preds)).mean()


def t_last_tick(preds, targets):
    return F.cross_entropy(preds[:, -1], targets)


def t_imagination(preds, targets, ratio=0.5, bonus=0.1):
    ticks = preds.shape[1]
    c = min(math.ceil(ticks * ratio), ticks - 1)
    ce = t_tick_ce(preds, targets)
    loss = t_ctm(ce[:, c:], t_confidence(preds)[:, c:])
    if c > 0:
        loss = loss - bonus * torch.clamp((ce[:, 0] - ce[:, c]).detach(), min=0.0)
    return loss.mean()


def t_thinking(preds, targets, alpha=0.1, margin=0.01):
    ce = t_tick_ce(preds, targets)
    loss = t_ctm(ce, t_confidence(preds))
    hinge = torch.clamp(margin - (ce[:, :-1] - ce[:, 1:]), min=0.0)
    return (loss + alpha * hinge.mean(-1)).mean()


def t_stepwise(preds, targets, n_classes=5, lookahead=5):
    b, ticks, flat = preds.shape
    positions = flat // n_classes
    conf = t_confidence(preds)
    total = 0.0
    for i in range(b):
        ce = torch.stack(
            [F.cross_entropy(preds[i, :, p * n_classes : (p + 1) * n_classes], targets[i, p].repeat(ticks), reduction="none")
             for p in range(positions)],
            -1,
        )  # (T, P)
        t_min = int(t_first_argmin(ce.mean(-1, keepdim=True).T)[0])
        t_cert = int(t_last_argmax(conf[i : i + 1])[0])
        prefix = 0
        for p in range(positions):
            logits = preds[i, t_min, p * n_classes : (p + 1) * n_classes].detach().numpy()
            if int(np.flatnonzero(logits == logits.max())[-1]) != int(targets[i, p]):
                break
            prefix += 1
        horizon = min(prefix + lookahead, positions)
        if horizon == 0:
            continue
        total = total + 0.5 * (ce[t_min, :horizon].mean() + ce[t_cert, :horizon].mean())
    return total / b


def t_adaptive_exit(lambdas, preds, targets, beta=0.1):
    ce = t_tick_ce(preds, targets).detach()
    ticks = lambdas.shape[1]
    survive = torch.ones(lambdas.shape[0], dtype=lambdas.dtype)
    halting = []
    for t in range(ticks):
        if t == ticks - 1:
            halting.append(survive)
        else:
            halting.append(lambdas[:, t] * survive)
            survive = survive * (1.0 - lambdas[:, t])
    p = torch.stack(halting, 1)
    entropy = -(p * torch.log(torch.clamp(p, min=1e-10))).sum(-1)
    return ((p * ce).sum(-1) - beta * entropy).mean()


# --------------------------------------------------------------------------------------------
# helpers


def both(loss_fn, torch_fn, preds, targets):
    """Return (modgrad value, modgrad grad, torch value, torch grad) wrt predictions."""
    value, grad = mg.value_and_grad(lambda p: loss_fn(p, targets))(preds)
    tp = torch.tensor(preds, requires_grad=True)
    tv = torch_fn(tp, torch.tensor(targets))
    tv.backward()
    return float(value), grad, float(tv.detach()), tp.grad.numpy()


def check(loss_fn, torch_fn, preds, targets):
    value, grad, t_value, t_grad = both(loss_fn, torch_fn, preds, targets)
    np.testing.assert_allclose(value, t_value, **TOL)
    np.testing.assert_allclose(grad, t_grad, **TOL)
    return grad


@pytest.fixture
def batch(rng):
    preds = rng.normal(size=(6, 5, 7)) * 2.0  # (B, T, C)
    targets = rng.integers(0, 7, size=6)
    return preds, targets


# --------------------------------------------------------------------------------------------
# masks


def test_first_min_mask_breaks_ties_to_first():
    x = np.array([[3.0, 1.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(first_min_mask(x), np.eye(4)[[1, 0, 3]])


def test_last_max_mask_breaks_ties_to_last():
    x = np.array([[3.0, 1.0, 3.0, 1.0], [0.5, 0.5, 0.5, 0.5], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(last_max_mask(x), np.eye(4)[[2, 3, 0]])


# --------------------------------------------------------------------------------------------
# losses vs torch


def test_ctm_loss_matches_torch(batch):
    check(CtmLoss(), t_ctm_loss, *batch)


def test_ctm_loss_grad_only_on_chosen_ticks(batch):
    preds, targets = batch
    grad = check(CtmLoss(), t_ctm_loss, preds, targets)
    touched = (np.abs(grad).sum(-1) > 0).sum(-1)  # ticks with gradient, per example
    assert np.all(touched >= 1)
    assert np.all(touched <= 2)


def test_ctm_loss_tied_ticks(rng):
    preds = rng.normal(size=(3, 4, 5))
    preds[:, 2] = preds[:, 0]  # ticks 0 and 2 tie on both CE and certainty
    preds[:, 1] = preds[:, 0] * 0.1  # flatter: less certain, and a different CE
    preds[:, 3] = preds[:, 0] * 0.1
    targets = np.array([0, 1, 2])
    check(CtmLoss(), t_ctm_loss, preds, targets)


def test_ctm_loss_with_given_certainties(batch):
    preds, targets = batch
    certs = np.stack([np.zeros(preds.shape[:2]), np.tile(np.arange(5.0), (6, 1))], -1)  # last tick most certain
    value, grad = mg.value_and_grad(lambda p: CtmLoss()(p, targets, certs))(preds)
    tp = torch.tensor(preds, requires_grad=True)
    ce = t_tick_ce(tp, torch.tensor(targets))
    expected = t_ctm(ce, torch.tensor(certs[..., 1])).mean()
    expected.backward()
    np.testing.assert_allclose(float(value), float(expected.detach()), **TOL)
    np.testing.assert_allclose(grad, tp.grad.numpy(), **TOL)


def test_last_tick_ce_matches_torch(batch):
    grad = check(LastTickCE(), t_last_tick, *batch)
    assert np.all(grad[:, :-1] == 0.0)


@pytest.mark.parametrize("ticks", [1, 2, 3, 8])
def test_imagination_loss_matches_torch(rng, ticks):
    preds = rng.normal(size=(5, ticks, 6)) * 2.0
    targets = rng.integers(0, 6, size=5)
    grad = check(ImaginationLoss(), t_imagination, preds, targets)
    c = min(math.ceil(ticks * 0.5), ticks - 1)
    assert np.all(grad[:, :c] == 0.0)


def test_imagination_bonus_lowers_value(rng):
    preds = rng.normal(size=(4, 4, 6))
    targets = rng.integers(0, 6, size=4)
    preds[np.arange(4), 2, targets] += 5.0  # tick 2 (the commit tick) far better than tick 0
    with_bonus = float(ImaginationLoss(bonus=0.1)(preds, targets))
    without = float(ImaginationLoss(bonus=0.0)(preds, targets))
    assert with_bonus < without


@pytest.mark.parametrize("ticks", [1, 2, 6])
def test_thinking_loss_matches_torch(rng, ticks):
    preds = rng.normal(size=(5, ticks, 6)) * 2.0
    targets = rng.integers(0, 6, size=5)
    torch_fn = t_thinking if ticks > 1 else t_ctm_loss
    check(ThinkingLoss(), torch_fn, preds, targets)


@pytest.mark.parametrize("lookahead", [0, 1, 5])
def test_stepwise_ce_matches_torch(rng, lookahead):
    b, ticks, positions, n = 6, 4, 8, 5
    targets = rng.integers(0, n, size=(b, positions))
    preds = rng.normal(size=(b, ticks, positions * n))
    # Make some prefixes correct at every tick so the curriculum horizon varies across examples.
    for i in range(b):
        for p in range(i):
            preds[i, :, p * n + targets[i, p]] += 6.0
    loss = StepwiseCE(n_classes=n, lookahead=lookahead)
    check(loss, lambda p, y: t_stepwise(p, y, n, lookahead), preds, targets)


def test_stepwise_ce_rejects_bad_width(rng):
    with pytest.raises(ValueError, match="multiple of n_classes"):
        StepwiseCE(n_classes=5)(rng.normal(size=(2, 3, 12)), np.zeros((2, 2), np.int64))


def test_adaptive_exit_loss_matches_torch(rng):
    b, ticks, c = 4, 5, 6
    preds = rng.normal(size=(b, ticks, c))
    targets = rng.integers(0, c, size=b)
    lambdas = 1.0 / (1.0 + np.exp(-rng.normal(size=(b, ticks))))
    loss = AdaptiveExitLoss(beta=0.1)
    value, (g_lam, g_pred) = mg.value_and_grad(lambda lam, p: loss(lam, p, targets), argnums=(0, 1))(lambdas, preds)
    tl = torch.tensor(lambdas, requires_grad=True)
    tv = t_adaptive_exit(tl, torch.tensor(preds), torch.tensor(targets))
    tv.backward()
    np.testing.assert_allclose(float(value), float(tv.detach()), **TOL)
    np.testing.assert_allclose(g_lam, tl.grad.numpy(), **TOL)
    assert np.all(g_pred == 0.0)  # the CE is behind a stop-gradient
    assert np.all(g_lam[:, -1] == 0.0)  # the last tick always halts


def test_adaptive_exit_halting_sums_to_one(rng):
    lambdas = rng.uniform(size=(3, 6))
    preds = np.zeros((3, 6, 4))
    targets = np.zeros(3, np.int64)
    # With equal CE at every tick the expected CE is CE * sum(p); entropy off.
    value = float(AdaptiveExitLoss(beta=0.0)(lambdas, preds, targets))
    np.testing.assert_allclose(value, math.log(4), rtol=1e-12)


def test_losses_run_traced(batch):
    """The traced (program) path gives the eager result."""
    preds, targets = batch
    for name in ("ctm", "last", "imagination", "thinking"):
        loss = make_loss(name)
        eager = mg.value_and_grad(lambda p: loss(p, targets))(preds)
        traced = mg.compile(mg.value_and_grad(lambda p, y: loss(p, y)), device="numpy")(preds, targets)
        np.testing.assert_allclose(traced[0], eager[0], **TOL)
        np.testing.assert_allclose(traced[1], eager[1], **TOL)


def test_make_loss_unknown_name():
    with pytest.raises(ValueError, match="unknown loss 'nope'; choose one of: ctm, last"):
        make_loss("nope")
