"""Schedules against torch's own schedulers, stepped the way the official scripts step them."""

import numpy as np
import pytest

from rwkvunet_jax.train.schedules import make_schedule


def _torch_lrs(make_scheduler, steps, base_lr=1e-3):
    torch = pytest.importorskip("torch")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = make_scheduler(torch, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs)


def _ours(schedule, steps):
    return np.array([float(schedule(i)) for i in range(steps)])


def test_cosine_matches_torch_cosine_annealing_per_iteration():
    ref = _torch_lrs(lambda t, o: t.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=1e-5), 50)
    ours = _ours(make_schedule("cosine", lr=1e-3, total_steps=50, min_lr=1e-5), 50)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-9)


def test_poly_matches_official_synapse_formula_and_torch_polynomial_lr():
    ref = _torch_lrs(lambda t, o: t.optim.lr_scheduler.PolynomialLR(o, total_iters=40, power=0.9), 40)
    ours = _ours(make_schedule("poly", lr=1e-3, total_steps=40, power=0.9), 40)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-9)
    assert ours[0] == pytest.approx(1e-3)  # the first iteration uses the base lr, as in the official trainer


def test_cosine_restarts_reproduces_acdc_per_iteration_quirk():
    # 150 epochs -> T_max = 112 iterations, stepped per iteration, so the lr oscillates for the whole run.
    steps = 600
    ref = _torch_lrs(lambda t, o: t.optim.lr_scheduler.CosineAnnealingLR(o, T_max=112, eta_min=1e-6), steps, 5e-4)
    ours = _ours(make_schedule("cosine_restarts", lr=5e-4, total_steps=steps, min_lr=1e-6, period_steps=112), steps)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-9)
    assert ours[224] == pytest.approx(5e-4, rel=1e-5)  # back at the peak after one period


def test_warmup_then_cosine():
    sched = make_schedule("cosine", lr=1.0, total_steps=20, min_lr=0.0, warmup_steps=5)
    np.testing.assert_allclose(_ours(sched, 6), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-6)
    assert float(sched(19)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 14 / 15)), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="linear"), "unknown schedule"),
        (dict(total_steps=0), "total_steps"),
        (dict(warmup_steps=10), "warmup_steps"),
        (dict(name="cosine_restarts"), "period_steps"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(name="cosine", lr=1e-3, total_steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        make_schedule(args.pop("name"), **args)
