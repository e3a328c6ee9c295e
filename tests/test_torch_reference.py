"""The PyTorch twin: official state_dict layout of all six models, its bi-WKV, inputs and options.

Independent references: the official state_dict listings (shared/reference, or their digests), a
literal per-element loop over the WKV tables written here, the JAX ``bi_wkv``, and numpy loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rwkvunet_jax.torch_reference import bi_wkv, bi_wkv_dense, build_torch_model  # noqa: E402
from rwkvunet_jax.torch_reference.layers import q_shift  # noqa: E402
from test_convert_fixtures import REAL, TINY, check_against_reference, layout_lines  # noqa: E402


@pytest.mark.parametrize("name,num_classes,in_chans,filename,entries,digest", REAL, ids=[r[0] for r in REAL])
def test_state_dict_is_the_official_layout(name, num_classes, in_chans, filename, entries, digest):
    module = build_torch_model(name, num_classes=num_classes, in_chans=in_chans)
    check_against_reference(layout_lines(module.state_dict()), filename, entries, digest)


# ------------------------------------------------------------------------------------------------ WKV


def _loop_wkv(w, u, k, v, variant):
    """The WKV tables of the task statement, one (t, m) term at a time, in float64."""
    batch, tokens, channels = k.shape
    n = max(1, math.ceil(tokens / 32))
    y = np.zeros((batch, tokens, channels))
    for b in range(batch):
        for c in range(channels):
            wc, uc = float(w[c]), float(u[c])
            for t in range(tokens):
                s = n * (t // n)
                num = den = 0.0
                for m in range(tokens):
                    km = float(k[b, m, c])
                    if variant == "paper":
                        f = math.exp(uc) if m == t else math.exp(-(abs(t - m) - 1) * wc)
                    elif m < s:
                        f = math.exp(-wc * (t - m))
                    elif m == s < t:
                        f = math.exp(-wc * (t - m - 1))
                    elif s < m < t:
                        f = math.exp(-wc * (t - m - 1)) + (1 - math.exp(wc)) * math.exp(wc * (t - m))
                    elif m == t:
                        f = math.exp(uc) + (t > s) * (1 - math.exp(wc))
                    else:
                        f = math.exp(-wc * (m - t))
                    num += math.exp(km) * f * float(v[b, m, c])
                    den += math.exp(km) * f
                if variant == "official":
                    # The kernel's running maximum o_t = max(o1, o2, u + k_t), set by set.
                    kc = [float(x) for x in k[b, :, c]]
                    exps = [uc + kc[t]]
                    exps += [kc[m] - wc * (t - m) for m in range(s)]  # o2
                    exps += [kc[m] - wc * (t - 1 - m) for m in range(s, t)]
                    exps += [kc[m] - wc * (m - s) + wc * (t - s) for m in range(s, tokens)]  # o1
                    exps += [kc[m] + wc * (t - m + 1) for m in range(s + 1, t + 1)]
                    den += 1e-6 * math.exp(max(exps))
                y[b, t, c] = num / den
    return y


def _inputs(tokens, channels=3, batch=2, decay_scale=4.0, seed=0, bonus=None):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, decay_scale, channels) / tokens
    u = rng.normal(0, 2.0, channels) / tokens * 4 if bonus is None else np.full(channels, float(bonus))
    k = rng.normal(0, 1.5, (batch, tokens, channels))
    v = rng.normal(0, 1.0, (batch, tokens, channels))
    return [torch.tensor(a, dtype=torch.float64) for a in (w, u, k, v)]


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("tokens", [1, 2, 7, 32, 33, 50, 64, 97])
def test_wkv_matches_the_tables_term_by_term(variant, tokens):
    w, u, k, v = _inputs(tokens, channels=2, batch=1 if tokens > 40 else 2, seed=tokens)
    expected = _loop_wkv(w.numpy(), u.numpy(), k.numpy(), v.numpy(), variant)
    np.testing.assert_allclose(bi_wkv_dense(w, u, k, v, variant=variant).numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bi_wkv(w, u, k, v, variant=variant).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tokens", [1, 2, 31, 32, 33])
def test_wkv_official_eps_scale_with_negative_bonus(tokens):
    # u << 0 with large decays: the EPS term, scaled by the kernel's running maximum, is far from 1e-6 relative.
    w, u, k, v = _inputs(tokens, channels=3, decay_scale=3.0 * tokens, seed=tokens, bonus=-9.0)
    expected = _loop_wkv(w.numpy(), u.numpy(), k.numpy(), v.numpy(), "official")
    np.testing.assert_allclose(bi_wkv_dense(w, u, k, v).numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bi_wkv(w, u, k, v).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_wkv_variants_differ_and_fast_form_survives_large_exponents():
    w, u, k, v = _inputs(100, channels=4, decay_scale=60.0)  # |decay| ~ 60, k spread ~ 15
    k = k * 3
    official = bi_wkv(w, u, k, v)
    assert torch.isfinite(official).all()
    np.testing.assert_allclose(official.numpy(), bi_wkv_dense(w, u, k, v).numpy(), rtol=1e-9, atol=1e-12)
    paper = bi_wkv(w, u, k, v, variant="paper")
    np.testing.assert_allclose(paper.numpy(), bi_wkv_dense(w, u, k, v, variant="paper").numpy(), rtol=1e-9,
                               atol=1e-12)
    assert (official - paper).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_wkv_gradients_of_fast_and_dense_forms_agree(variant):
    args = [a.requires_grad_() for a in _inputs(70, channels=3, seed=5)]
    cotangent = torch.randn(2, 70, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in (bi_wkv, bi_wkv_dense):
        out = fn(*args, variant=variant)
        grads.append(torch.autograd.grad((out * cotangent).sum(), args))
    for fast, dense in zip(*grads):
        assert torch.isfinite(fast).all()
        np.testing.assert_allclose(fast.numpy(), dense.numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_wkv_matches_the_jax_operator(variant):
    jnp = pytest.importorskip("jax.numpy")
    from rwkvunet_jax.wkv import bi_wkv as jax_bi_wkv

    w, u, k, v = (a.float() for a in _inputs(80, channels=8, seed=9))
    expected = np.asarray(jax_bi_wkv(*(jnp.asarray(a.numpy()) for a in (w, u, k, v)), impl="naive", variant=variant))
    got = bi_wkv(w, u, k, v, variant=variant)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5, atol=2e-6)


def test_wkv_rejects_bad_shapes():
    w, u, k, v = _inputs(4)
    with pytest.raises(ValueError, match="variant"):
        bi_wkv(w, u, k, v, variant="cuda")
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        bi_wkv(w, u, k, v[:, :, :2])
    with pytest.raises(ValueError, match=r"\(3,\)"):
        bi_wkv(w[:2], u, k, v)


# ------------------------------------------------------------------------------------------ modules


def test_q_shift_matches_neighbour_loops():
    h, w, c = 3, 5, 10
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    grid = x.numpy().reshape(2, h, w, c)
    expected = np.zeros_like(grid)
    bounds = [0, int(c / 4), int(c / 2), int(3 * c / 4), c]
    offsets = [(0, -1), (0, 1), (-1, 0), (1, 0)]  # left, right, above, below neighbour
    for g, (dy, dx) in enumerate(offsets):
        for i in range(h):
            for j in range(w):
                if 0 <= i + dy < h and 0 <= j + dx < w:
                    expected[:, i, j, bounds[g]:bounds[g + 1]] = grid[:, i + dy, j + dx, bounds[g]:bounds[g + 1]]
    np.testing.assert_array_equal(q_shift(x, (h, w)).numpy(), expected.reshape(2, h * w, c))


def test_non_square_inputs_channels_and_modes():
    torch.manual_seed(0)
    seg = build_torch_model("rwkv_unet_b", num_classes=4, in_chans=1, **TINY).eval()
    x = torch.randn(2, 1, 96, 64)
    with torch.no_grad():
        y = seg(x)
        assert y.shape == (2, 4, 96, 64)
        # One channel is repeated to three: a 3-channel twin with the same weights agrees.
        rgb = build_torch_model("rwkv_unet_b", num_classes=4, in_chans=3, **TINY).eval()
        rgb.load_state_dict(seg.state_dict())
        torch.testing.assert_close(rgb(x.repeat(1, 3, 1, 1)), y)
    four = build_torch_model("rwkv_unet_encoder_t", num_classes=5, in_chans=4, **TINY)
    assert four.state_dict()["stage0.0.conv.conv.weight"].shape == (4, 4, 1, 1)
    with pytest.raises(ValueError, match=r"multiples of 16.*\(1, 4, 40, 64\)"):
        four(torch.randn(1, 4, 40, 64))
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        four(torch.randn(1, 3, 64, 64))
    # Drop path draws in training mode only (a high rate, so that every draw drops something).
    dropping = build_torch_model("rwkv_unet_encoder_t", num_classes=5, in_chans=4, drop_path_rate=0.9, **TINY)
    dropping.load_state_dict(four.state_dict())
    z = torch.randn(4, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(z), four.eval()(z), rtol=0, atol=0)
        dropping.train()
        assert not torch.equal(dropping(z), dropping(z))


def test_build_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match="unknown model 'rwkv_unet_x'"):
        build_torch_model("rwkv_unet_x", num_classes=2)
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['depth'\]"):
        build_torch_model("rwkv_unet_t", num_classes=2, depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="wkv_variant"):
        build_torch_model("rwkv_unet_t", num_classes=2, wkv_variant="cuda")
