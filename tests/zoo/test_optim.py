"""The textbook's optimizers: hand-computed steps, torch.optim parity, both code paths, convergence,
state-dict round trip, argument checking, and the lr schedules. Table-driven over the registry."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from zoo.optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler

F64 = torch.float64

# --- two steps of each textbook formula, by hand, in plain floats ----------------------------------
# Gradients are given, not computed, so each rule is checked on its own arithmetic. eps is large
# (0.01) so that eps inside vs outside the square root gives visibly different numbers.
P0, G1, G2 = [1.0, -2.0, 0.5], [0.5, -1.0, 2.0], [0.2, 0.4, -1.0]


def _hand_sgd(t, g1, g2, lr=0.1):
    t1 = t - lr * g1
    return t1, t1 - lr * g2


def _hand_momentum(t, g1, g2, lr=0.1, gamma=0.9):
    v1 = gamma * 0.0 + lr * g1
    t1 = t - v1
    v2 = gamma * v1 + lr * g2
    return t1, t1 - v2


def _hand_nesterov(t, g1, g2, lr=0.1, gamma=0.9):
    # Textbook form: v = gamma v + lr * grad J(theta - gamma v); theta -= v. The g's stand for the
    # gradients at the look-ahead points, which is where the parameters live: phi = theta - gamma v.
    v1 = lr * g1
    t1 = t - v1
    v2 = gamma * v1 + lr * g2
    t2 = t1 - v2
    return t1 - gamma * v1, t2 - gamma * v2


def _hand_adagrad(t, g1, g2, lr=0.1, eps=0.01):
    s1 = g1 ** 2
    t1 = t - lr * g1 / math.sqrt(s1 + eps)
    s2 = s1 + g2 ** 2
    return t1, t1 - lr * g2 / math.sqrt(s2 + eps)


def _hand_adadelta(t, g1, g2, rho=0.9, eps=0.01):
    eg1 = (1 - rho) * g1 ** 2
    d1 = -math.sqrt(0.0 + eps) / math.sqrt(eg1 + eps) * g1
    edx1 = (1 - rho) * d1 ** 2
    t1 = t + d1
    eg2 = rho * eg1 + (1 - rho) * g2 ** 2
    d2 = -math.sqrt(edx1 + eps) / math.sqrt(eg2 + eps) * g2
    return t1, t1 + d2


def _hand_rmsprop(t, g1, g2, lr=0.1, alpha=0.9, eps=0.01):
    e1 = alpha * 0.0 + (1 - alpha) * g1 ** 2
    t1 = t - lr * g1 / math.sqrt(e1 + eps)
    e2 = alpha * e1 + (1 - alpha) * g2 ** 2
    return t1, t1 - lr * g2 / math.sqrt(e2 + eps)


def _hand_adam(t, g1, g2, lr=0.1, b1=0.9, b2=0.999, eps=0.01):
    m1, v1 = (1 - b1) * g1, (1 - b2) * g1 ** 2
    t1 = t - lr * (m1 / (1 - b1)) / (math.sqrt(v1 / (1 - b2)) + eps)
    m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2 ** 2
    return t1, t1 - lr * (m2 / (1 - b1 ** 2)) / (math.sqrt(v2 / (1 - b2 ** 2)) + eps)


# name -> (hyperparameters for create_optimizer, scalar hand computation with the same values)
HAND = {
    "sgd": (dict(lr=0.1), _hand_sgd),
    "momentum": (dict(lr=0.1, momentum=0.9), _hand_momentum),
    "nesterov": (dict(lr=0.1, momentum=0.9), _hand_nesterov),
    "adagrad": (dict(lr=0.1, eps=0.01), _hand_adagrad),
    "adadelta": (dict(rho=0.9, eps=0.01), _hand_adadelta),
    "rmsprop": (dict(lr=0.1, alpha=0.9, eps=0.01), _hand_rmsprop),
    "adam": (dict(lr=0.1, betas=(0.9, 0.999), eps=0.01), _hand_adam),
}


def test_hand_table_covers_registry():
    assert set(HAND) == set(OPTIMIZERS)


def test_a_few_hand_numbers():
    # The plain-float references themselves, written out for the simplest rules.
    assert _hand_momentum(1.0, 0.5, 0.2) == pytest.approx((0.95, 0.885))
    assert _hand_nesterov(1.0, 0.5, 0.2) == pytest.approx((0.905, 0.8265))
    assert _hand_adagrad(1.0, 0.5, 0.2)[0] == pytest.approx(1.0 - 0.05 / math.sqrt(0.26))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_steps_by_hand(name, foreach):
    kwargs, hand = HAND[name]
    p = torch.tensor(P0, dtype=F64, requires_grad=True)
    opt = create_optimizer(name, [p], foreach=foreach, **kwargs)
    expected = [hand(t, a, b) for t, a, b in zip(P0, G1, G2)]
    for k, g in enumerate([G1, G2]):
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor([e[k] for e in expected], dtype=F64),
                                   rtol=1e-12, atol=1e-12)


# --- parity with torch.optim where the conventions coincide -------------------------------------
TORCH_TWINS = {
    "sgd": (dict(lr=0.01), lambda ps, wd: torch.optim.SGD(ps, lr=0.01, weight_decay=wd)),
    "momentum": (dict(lr=0.01), lambda ps, wd: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=wd)),
    "nesterov": (dict(lr=0.01), lambda ps, wd: torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True,
                                                               weight_decay=wd)),
    "adadelta": (dict(), lambda ps, wd: torch.optim.Adadelta(ps, lr=1.0, rho=0.9, eps=1e-6, weight_decay=wd)),
    "adam": (dict(lr=0.01), lambda ps, wd: torch.optim.Adam(ps, lr=0.01, weight_decay=wd)),
}
SHAPES = [(3, 4), (5,), (2, 3, 2), (1,)]


def _make_params(dtype=F64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def _loss(params):
    # Non-quadratic so gradients keep changing direction and scale along the trajectory.
    return sum(((p ** 2 - 0.5) ** 2).sum() + (0.3 * p).sin().sum() for p in params)


def _run(opt, params, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(params).backward()
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_matches_torch_optim(name, foreach, weight_decay):
    kwargs, make_twin = TORCH_TWINS[name]
    ours, theirs = _make_params(), _make_params()
    _run(create_optimizer(name, ours, foreach=foreach, weight_decay=weight_decay, **kwargs), ours, 100)
    _run(make_twin(theirs, weight_decay), theirs, 100)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreach_equals_single_tensor(name):
    results = []
    for foreach in (True, False):
        params = _make_params()
        unused = torch.zeros(2, dtype=F64, requires_grad=True)  # never gets a gradient
        groups = [{"params": params[:2]},
                  {"params": params[2:] + [unused], "weight_decay": 0.1}]
        opt = create_optimizer(name, groups, weight_decay=0.01, foreach=foreach)
        _run(opt, params, 10)
        assert not opt.state[unused], "state must be lazy"
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_nesterov_equals_seed_literal_form(foreach):
    """The stored look-ahead point phi equals theta - gamma * v of the textbook's literal rule."""
    a = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=F64)  # J = x.A.x / 2 - b.x, SPD
    b = torch.tensor([1.0, -2.0], dtype=F64)
    lr, gamma = 0.1, 0.9
    theta, v = torch.tensor([2.0, 1.5], dtype=F64), torch.zeros(2, dtype=F64)
    phi = theta.clone().requires_grad_()
    opt = create_optimizer("nesterov", [phi], lr=lr, momentum=gamma, foreach=foreach)
    for _ in range(30):
        v = gamma * v + lr * (a @ (theta - gamma * v) - b)
        theta = theta - v
        opt.zero_grad()
        (0.5 * phi @ a @ phi - b @ phi).backward()
        opt.step()
        torch.testing.assert_close(phi.detach(), theta - gamma * v, rtol=0, atol=1e-12)
    torch.testing.assert_close(phi.detach() + gamma * opt.state[phi]["momentum_buffer"], theta)


def test_momentum_lr_change_only_scales_new_gradients():
    # Documented departure from torch.optim.SGD: after an lr change the old velocity keeps its scale.
    p = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = create_optimizer("momentum", [p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(1, dtype=F64)
    opt.step()  # v = 0.1
    opt.param_groups[0]["lr"] = 0.01
    opt.step()  # v = 0.9 * 0.1 + 0.01 * 1 = 0.1; torch would use 0.01 * (0.9 * 1 + 1) = 0.019
    assert p.item() == pytest.approx(-0.2)


# --- convergence ---------------------------------------------------------------------------------
# name -> (lr, steps): tuned per rule; the loss must fall by 10x from 12.5 at (-1.5, 2).
ROSENBROCK = {
    "sgd": (2e-3, 500),
    "momentum": (1e-3, 500),
    "nesterov": (1e-3, 500),
    "adagrad": (2.0, 500),
    "adadelta": (1.0, 1000),  # the textbook's rule, no learning rate; slow start of ~sqrt(eps) steps
    "rmsprop": (1e-2, 500),
    "adam": (0.1, 500),
}


def _rosenbrock(xy):
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rosenbrock_progress(name):
    lr, steps = ROSENBROCK[name]
    xy = torch.tensor([-1.5, 2.0], dtype=F64, requires_grad=True)
    start = _rosenbrock(xy).item()
    opt = create_optimizer(name, [xy], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _rosenbrock(xy).backward()
        opt.step()
    assert _rosenbrock(xy).item() < start / 10


# --- state dict, closure -------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip(name, foreach):
    straight = _make_params()
    opt = create_optimizer(name, straight, weight_decay=0.01, foreach=foreach)
    _run(opt, straight, 10)

    resumed = _make_params()
    first = create_optimizer(name, resumed, weight_decay=0.01, foreach=foreach)
    _run(first, resumed, 5)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = [p.detach().clone().requires_grad_() for p in resumed]
    second = create_optimizer(name, resumed, foreach=foreach)  # hyperparameters come from the state
    second.load_state_dict(torch.load(buffer, weights_only=True))
    _run(second, resumed, 5)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


STATE_KEYS = {"sgd": set(), "momentum": {"momentum_buffer"}, "nesterov": {"momentum_buffer"},
              "adagrad": {"sum"}, "adadelta": {"square_avg", "acc_delta"}, "rmsprop": {"square_avg"},
              "adam": {"step", "exp_avg", "exp_avg_sq"}}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_is_lazy_and_named_per_rule(name):
    """State appears at a parameter's first step, with the rule's names; plain SGD keeps none
    (as torch.optim.SGD: no empty entries in a checkpoint); a parameter without a gradient gets none."""
    params = _make_params()
    opt = create_optimizer(name, params)
    assert opt.state_dict()["state"] == {}
    _loss(params[:-1]).backward()  # the last parameter gets no gradient
    opt.step()
    state = opt.state_dict()["state"]
    if not STATE_KEYS[name]:
        assert state == {}
    else:
        assert sorted(state) == list(range(len(params) - 1))
        assert all(set(s) == STATE_KEYS[name] for s in state.values())


def test_momentum_turned_on_later_starts_from_a_zero_buffer():
    params = _make_params()
    opt = create_optimizer("sgd", params, lr=0.1)
    _run(opt, params, 2)
    opt.param_groups[0]["momentum"] = 0.9  # e.g. a warm-up without momentum
    before = [p.detach().clone() for p in params]
    _run(opt, params, 1)
    # a zero buffer: the first step with momentum is a plain step, v = lr * g
    for p, b in zip(params, before):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b - p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure(name):
    params = _make_params()
    expected = copy.deepcopy(params)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(params)
        loss.backward()
        return loss

    opt = create_optimizer(name, params)
    loss = opt.step(closure)
    assert len(calls) == 1
    assert loss.item() == pytest.approx(_loss(expected).item())
    assert any(not torch.equal(a, b) for a, b in zip(params, expected))
    assert opt.step() is None


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sparse_gradients_refused(name):
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        create_optimizer(name, emb.parameters()).step()


# --- arguments -----------------------------------------------------------------------------------
INVALID = [
    ("sgd", dict(lr=-1), "Invalid learning rate: -1"),
    ("sgd", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    ("sgd", dict(momentum=0.9), "sgd fixes momentum=0.0; got momentum=0.9"),
    ("momentum", dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    ("momentum", dict(nesterov=True), "momentum fixes nesterov=False; got nesterov=True"),
    ("nesterov", dict(momentum=0.0), "Nesterov momentum requires momentum > 0, got momentum=0.0"),
    ("nesterov", dict(nesterov=False), "nesterov fixes nesterov=True; got nesterov=False"),
    ("adagrad", dict(lr=-0.01), "Invalid learning rate: -0.01"),
    ("adagrad", dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    ("adadelta", dict(rho=1.5), "Invalid rho value: 1.5"),
    ("adadelta", dict(lr=-1.0), "Invalid learning rate: -1.0"),
    ("rmsprop", dict(alpha=-0.1), "Invalid alpha value: -0.1"),
    ("rmsprop", dict(weight_decay=-1), "Invalid weight_decay value: -1"),
    ("adam", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    ("adam", dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    ("adam", dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    ("adam", dict(lr=float("nan")), "Invalid learning rate: nan"),
]


@pytest.mark.parametrize("name,kwargs,message", INVALID, ids=[f"{n}-{m}" for n, _, m in INVALID])
def test_invalid_arguments(name, kwargs, message):
    with pytest.raises(ValueError) as info:
        create_optimizer(name, [torch.zeros(1, requires_grad=True)], **kwargs)
    assert str(info.value) == message


def test_unknown_optimizer_lists_choices():
    with pytest.raises(ValueError) as info:
        create_optimizer("adamw", [torch.zeros(1, requires_grad=True)])
    assert str(info.value) == ("Unknown optimizer 'adamw'; choose one of: "
                               "sgd, momentum, nesterov, adagrad, adadelta, rmsprop, adam")


@pytest.mark.parametrize("name,expected", [
    ("sgd", dict(lr=0.01, momentum=0.0, nesterov=False)),
    ("momentum", dict(lr=0.01, momentum=0.9, nesterov=False)),
    ("nesterov", dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("adagrad", dict(lr=0.01, eps=1e-8)),
    ("adadelta", dict(lr=1.0, rho=0.9, eps=1e-6)),
    ("rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-8)),
    ("adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)),
])
def test_defaults(name, expected):
    opt = create_optimizer(name, [torch.zeros(1, requires_grad=True)])
    assert {k: opt.defaults[k] for k in expected} == expected
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["foreach"] is True


# --- schedules -----------------------------------------------------------------------------------
def _lrs(name, steps, base_lr=1.0, **kwargs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = create_scheduler(name, opt, **kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


C1, C3 = (1 + math.cos(math.pi / 4)) / 2, (1 + math.cos(3 * math.pi / 4)) / 2  # 0.8536, 0.1464


@pytest.mark.parametrize("name,kwargs,expected", [
    ("none", dict(epochs=3, steps_per_epoch=2), [1.0] * 6),
    ("step", dict(epochs=4, steps_per_epoch=2, decay_epochs=1, decay_rate=0.5),
     [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]),
    ("cosine", dict(epochs=4, steps_per_epoch=1), [1.0, C1, 0.5, C3]),
    ("cosine", dict(epochs=2, steps_per_epoch=2, min_lr_factor=0.2),
     [1.0, 0.2 + 0.8 * C1, 0.6, 0.2 + 0.8 * C3]),
    ("cosine", dict(epochs=6, steps_per_epoch=1, warmup_epochs=2, warmup_start_factor=0.1),
     [0.1, 0.55, 1.0, C1, 0.5, C3]),
    ("step", dict(epochs=5, steps_per_epoch=1, warmup_epochs=2, warmup_start_factor=0.5, decay_epochs=3),
     [0.5, 0.75, 1.0, 0.1, 0.1]),
    ("none", dict(epochs=3, steps_per_epoch=1, warmup_epochs=2, warmup_start_factor=0.2), [0.2, 0.6, 1.0]),
])
def test_scheduler_values(name, kwargs, expected):
    assert _lrs(name, len(expected), base_lr=2.0, **kwargs) == pytest.approx([2.0 * e for e in expected])


def test_step_scheduler_matches_torch_steplr():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs("step", 10, base_lr=0.1, epochs=10, steps_per_epoch=1, decay_epochs=3) == pytest.approx(expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="linear"), "Unknown scheduler 'linear'; choose one of: none, step, cosine"),
    (dict(epochs=0), "Invalid epochs: 0"),
    (dict(steps_per_epoch=0), "Invalid steps_per_epoch: 0"),
    (dict(warmup_epochs=5), "Invalid warmup_epochs: 5 (an int in [0, epochs))"),
    (dict(warmup_start_factor=0.0), "Invalid warmup_start_factor: 0.0"),
])
def test_scheduler_invalid(kwargs, message):
    args = dict(name="cosine", epochs=5, steps_per_epoch=1) | kwargs
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError) as info:
        create_scheduler(optimizer=opt, **args)
    assert str(info.value) == message
    assert set(SCHEDULERS) == {"none", "step", "cosine"}
