"""Optimisers, clipping and schedules: eager float64 against torch.optim, and one compiled train step."""

import math

import numpy as np
import pytest

import modgrad as mg
from modgrad import ops
from modgrad.optim import (
    SGD,
    Adam,
    AdamW,
    ReferenceRegionalAdamW,
    clip_by_global_norm,
    default_decay_mask,
    linear_warmup_cosine,
    tree_paths,
)
from modgrad.engine.pytree import tree_flatten, tree_map, tree_unflatten

torch = pytest.importorskip("torch")

STEPS = 20
# float64 eager against torch float64: only rounding-order differences remain.
RTOL_F64, ATOL_F64 = 1e-10, 1e-12


def small_tree(rng) -> dict:
    """Weights, a 1-D bias, a layer norm, a list entry, batched (R, ...) weights and biases, a 0-d scalar."""
    return {
        "temperature": np.asarray(rng.normal()),
        "layer": {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)},
        "ln": {"g": 1.0 + 0.1 * rng.normal(size=3), "b": 0.1 * rng.normal(size=3)},
        "head": [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}],
        "nlm": {"w": rng.normal(size=(2, 3, 3)), "b": rng.normal(size=(2, 3))},
    }


def grad_sequence(params, steps: int, scale: float = 1.0, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    leaves, treedef = tree_flatten(params)
    return [tree_unflatten(treedef, [scale * rng.normal(size=x.shape) for x in leaves]) for _ in range(steps)]


def to_torch(params) -> dict:
    leaves = tree_flatten(params)[0]
    return {path: torch.tensor(x, dtype=torch.float64, requires_grad=True) for path, x in zip(tree_paths(params), leaves)}


def run_torch(tensors: dict, make_opt, grads: list, set_lr=None) -> dict:
    opt = make_opt(tensors)
    for k, g in enumerate(grads):
        for path, x in zip(tree_paths(g), tree_flatten(g)[0]):
            tensors[path].grad = torch.tensor(x, dtype=torch.float64)
        if set_lr is not None:
            set_lr(opt, tensors)
        opt.step()
    return {path: t.detach().numpy() for path, t in tensors.items()}


def run_ours(opt, params, grads: list):
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return params, state


def assert_tree_close(ours, expected: dict, rtol: float, atol: float) -> None:
    for path, x in zip(tree_paths(ours), tree_flatten(ours)[0]):
        assert np.shape(x) == np.shape(expected[path]), path
        np.testing.assert_allclose(x, expected[path], rtol=rtol, atol=atol, err_msg=path)


# --------------------------------------------------------------------------------------------
# Decay mask


@pytest.mark.parametrize(
    "path,shape,decayed",
    [
        ("layer/w", (4, 3), True),
        ("nlm/w", (2, 3, 3), True),
        ("layer/b", (3,), False),
        ("nlm/b", (2, 3), False),
        ("attn/bias", (2, 3), False),
        ("kv_ln/g", (3,), False),
        ("regions/ln/g", (8, 3), False),
        ("blocks/0/input_layernorm/weight", (2, 3), False),
        ("final_norm/scale", (2, 3), False),
        ("start_trace", (4, 5), True),
        ("decay_out", (5,), False),
        ("global_decay", (), False),
        ("temperature", (), False),
    ],
)
def test_default_decay_mask_cases(path, shape, decayed):
    assert default_decay_mask(path, np.zeros(shape)) is decayed


def test_tree_paths_order_matches_flatten():
    tree = {"synapse": [{"w": np.zeros(2)}, {"w": np.ones(3)}], "a": np.zeros(1)}
    assert tree_paths(tree) == ["a", "synapse/0/w", "synapse/1/w"]
    assert [x.shape for x in tree_flatten(tree)[0]] == [(1,), (2,), (3,)]


# --------------------------------------------------------------------------------------------
# Adam family against torch.optim


def test_adamw_matches_torch_grouped():
    params = small_tree(np.random.default_rng(0))
    grads = grad_sequence(params, STEPS)
    opt = AdamW(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    ours, state = run_ours(opt, params, grads)

    decayed = [p for p, x in zip(tree_paths(params), tree_flatten(params)[0]) if default_decay_mask(p, x)]
    assert sorted(decayed) == ["head/0/w", "layer/w", "nlm/w"]

    def make(tensors):
        groups = [
            {"params": [t for p, t in tensors.items() if p in decayed], "weight_decay": 0.1},
            {"params": [t for p, t in tensors.items() if p not in decayed], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95), eps=1e-8)

    expected = run_torch(to_torch(params), make, grads)
    assert_tree_close(ours, expected, RTOL_F64, ATOL_F64)
    assert int(state["step"]) == STEPS
    assert state["step"].dtype == np.int32


def test_adam_matches_torch():
    params = small_tree(np.random.default_rng(2))
    grads = grad_sequence(params, STEPS, seed=3)
    ours, _ = run_ours(Adam(lr=3e-3), params, grads)
    expected = run_torch(to_torch(params), lambda t: torch.optim.Adam(list(t.values()), lr=3e-3), grads)
    assert_tree_close(ours, expected, RTOL_F64, ATOL_F64)


def test_adamw_custom_mask_no_decay_equals_adam():
    params = small_tree(np.random.default_rng(4))
    grads = grad_sequence(params, 5, seed=5)
    no_decay, _ = run_ours(AdamW(lr=1e-2, weight_decay=0.5, decay_mask=lambda path, x: False), params, grads)
    adam, _ = run_ours(Adam(lr=1e-2), params, grads)
    for a, b in zip(tree_flatten(no_decay)[0], tree_flatten(adam)[0]):
        np.testing.assert_array_equal(a, b)


def test_adamw_lr_override_matches_torch_schedule():
    params = small_tree(np.random.default_rng(6))
    grads = grad_sequence(params, 8, seed=7)
    rates = [float(linear_warmup_cosine(k, 1e-2, 3, 8)) for k in range(8)]

    opt = AdamW(lr=123.0, decay_mask=lambda path, x: True)  # the override must replace lr
    state = opt.init(params)
    ours = params
    for k, g in enumerate(grads):
        ours, state = opt.update(ours, g, state, lr=linear_warmup_cosine(state["step"], 1e-2, 3, 8))

    steps = iter(range(8))

    def set_lr(torch_opt, tensors):
        torch_opt.param_groups[0]["lr"] = rates[next(steps)]

    expected = run_torch(to_torch(params), lambda t: torch.optim.AdamW(list(t.values()), weight_decay=0.01), grads, set_lr)
    # The schedule reads the int32 step as float32, so the rates carry float32 rounding.
    assert_tree_close(ours, expected, 1e-6, 1e-9)


# --------------------------------------------------------------------------------------------
# SGD against torch.optim.SGD


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 1e-2)])
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
    params = small_tree(np.random.default_rng(8))
    grads = grad_sequence(params, STEPS, seed=9)
    opt = SGD(lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    ours, state = run_ours(opt, params, grads)

    def make(tensors):
        return torch.optim.SGD(
            list(tensors.values()), lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )

    expected = run_torch(to_torch(params), make, grads)
    assert_tree_close(ours, expected, RTOL_F64, ATOL_F64)
    assert ("momentum" in state) is (momentum > 0)


def test_sgd_rejects_nesterov_without_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        SGD(lr=0.1, nesterov=True)


# --------------------------------------------------------------------------------------------
# Clipping


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm_matches_torch(max_norm):
    grads = grad_sequence(small_tree(np.random.default_rng(10)), 1, seed=11)[0]
    clipped, norm = clip_by_global_norm(grads, max_norm)

    tensors = {p: torch.tensor(x) for p, x in zip(tree_paths(grads), tree_flatten(grads)[0])}
    params = [torch.zeros_like(t, requires_grad=True) for t in tensors.values()]
    for p, t in zip(params, tensors.values()):
        p.grad = t.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

    np.testing.assert_allclose(norm, expected_norm.item(), rtol=RTOL_F64)
    for x, p in zip(tree_flatten(clipped)[0], params):
        np.testing.assert_allclose(x, p.grad.numpy(), rtol=RTOL_F64, atol=ATOL_F64)
    assert (float(norm) > max_norm) is (max_norm == 0.5)


# --------------------------------------------------------------------------------------------
# Schedule


def schedule_by_hand(step, base_lr, warmup, total, min_lr):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_cosine_matches_formula(warmup):
    total, base, low = 100, 3e-4, 3e-5
    for step in [0, 1, 5, 9, 10, 11, 50, 99, 100, 150]:
        expected = schedule_by_hand(step, base, warmup, total, low)
        got = linear_warmup_cosine(step, base, warmup, total, min_lr=low)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=f"step {step}")
        got32 = linear_warmup_cosine(np.asarray(step, np.int32), base, warmup, total, min_lr=low)
        assert got32.dtype == np.float32
        np.testing.assert_allclose(got32, expected, rtol=1e-6, err_msg=f"int32 step {step}")


def test_warmup_cosine_rejects_bad_lengths():
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup_cosine(0, 1e-3, warmup_steps=10, total_steps=5)


# --------------------------------------------------------------------------------------------
# The reference regional rule


def reference_group(path: str, array) -> str:
    if path.startswith("head"):
        return "frozen"
    if path.startswith("ln"):
        return "sgd"
    return "adamw" if default_decay_mask(path, array) else "adam"


def test_reference_regional_adamw_scales_lr():
    params = small_tree(np.random.default_rng(12))
    grads = grad_sequence(params, STEPS, scale=0.5, seed=13)
    # Every other step gets small gradients, so some steps clip and some do not.
    grads = [g if k % 2 else tree_map(lambda x: 0.05 * x, g) for k, g in enumerate(grads)]
    opt = ReferenceRegionalAdamW(group=reference_group, lr=1e-2, weight_decay=0.1, grad_clip=1.0)
    ours, _ = run_ours(opt, params, grads)

    paths = tree_paths(params)
    groups = {p: reference_group(p, x) for p, x in zip(paths, tree_flatten(params)[0])}
    norms = [np.sqrt(sum(np.sum(x**2) for x in tree_flatten(g)[0])) for g in grads]
    assert any(n > 1.0 for n in norms) and any(n < 1.0 for n in norms)
    factors = iter([min(1.0, 1.0 / n) for n in norms])

    def make(tensors):
        adamw = torch.optim.AdamW(
            [
                {"params": [tensors[p] for p in paths if groups[p] == "adamw"], "weight_decay": 0.1},
                {"params": [tensors[p] for p in paths if groups[p] == "adam"], "weight_decay": 0.0},
            ],
            lr=1e-2,
        )
        sgd = torch.optim.SGD([tensors[p] for p in paths if groups[p] == "sgd"], lr=1e-2)
        return _Both(adamw, sgd)

    def set_lr(both, tensors):
        lr = 1e-2 * next(factors)
        for group in both.adamw.param_groups + both.sgd.param_groups:
            group["lr"] = lr

    expected = run_torch(to_torch(params), make, grads, set_lr)
    for path in paths:
        if groups[path] == "frozen":
            expected[path] = tree_flatten(params)[0][paths.index(path)]
    assert_tree_close(ours, expected, RTOL_F64, ATOL_F64)


class _Both:
    def __init__(self, adamw, sgd):
        self.adamw, self.sgd = adamw, sgd

    def step(self):
        self.adamw.step()
        self.sgd.step()


# --------------------------------------------------------------------------------------------
# Errors


def test_update_rejects_mismatched_grads():
    params = small_tree(np.random.default_rng(14))
    opt = AdamW()
    state = opt.init(params)
    grads = grad_sequence(params, 1)[0]
    del grads["layer"]["b"]
    with pytest.raises(ValueError, match="layer/b"):
        opt.update(params, grads, state)


def test_init_rejects_integer_params():
    with pytest.raises(TypeError, match="idx"):
        AdamW().init({"w": np.zeros((2, 2)), "idx": np.arange(3)})


# --------------------------------------------------------------------------------------------
# One compiled train step


def mlp_loss(params, x, targets):
    h = ops.tanh(x @ params["l1"]["w"] + params["l1"]["b"])  # (N, H)
    logits = (h @ params["l2"]["w"] + params["l2"]["b"]) * params["temperature"]  # (N, C)
    return -ops.mean(ops.sum(ops.log_softmax(logits, -1) * targets, -1))


OPT = AdamW(lr=1e-2, weight_decay=0.1)


def train_step(params, state, x, targets):
    loss, grads = mg.value_and_grad(mlp_loss)(params, x, targets)
    grads, norm = clip_by_global_norm(grads, 0.5)
    lr = linear_warmup_cosine(state["step"], 1e-2, warmup_steps=2, total_steps=6)
    params, state = OPT.update(params, grads, state, lr=lr)
    return loss, norm, params, state


@pytest.mark.max
def test_compiled_adamw_step_matches_eager():
    pytest.importorskip("max")
    from modgrad.engine.compile import STATS

    rng = np.random.default_rng(15)
    params = {
        "l1": {"w": rng.normal(0, 0.5, (4, 8)).astype(np.float32), "b": np.zeros(8, np.float32)},
        "l2": {"w": rng.normal(0, 0.5, (8, 3)).astype(np.float32), "b": np.zeros(3, np.float32)},
        "temperature": np.ones((), np.float32),
    }
    batches = [
        (rng.normal(size=(6, 4)).astype(np.float32), np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)])
        for _ in range(5)
    ]
    step = mg.compile(train_step, device="cpu")

    eager_p, eager_s = params, OPT.init(params)
    comp_p, comp_s = params, OPT.init(params)
    compiles_after_first = None
    for k, (x, t) in enumerate(batches):
        e_loss, e_norm, eager_p, eager_s = train_step(eager_p, eager_s, x, t)
        c_loss, c_norm, comp_p, comp_s = step(comp_p, comp_s, x, t)
        if k == 0:
            compiles_after_first = STATS["compiles"]
        np.testing.assert_allclose(c_loss, e_loss, rtol=1e-5, err_msg=f"loss at step {k}")
        np.testing.assert_allclose(c_norm, e_norm, rtol=1e-5, err_msg=f"norm at step {k}")
        assert comp_s["step"].shape == ()
        assert int(comp_s["step"]) == k + 1

    assert STATS["compiles"] == compiles_after_first
    assert comp_p["temperature"].shape == ()
    assert_tree_close(comp_p, dict(zip(tree_paths(eager_p), tree_flatten(eager_p)[0])), 1e-5, 1e-6)
    for name in ("m", "v"):
        expected = dict(zip(tree_paths(eager_s[name]), tree_flatten(eager_s[name])[0]))
        assert_tree_close(comp_s[name], expected, 1e-5, 1e-9)
