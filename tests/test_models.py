"""The model: official sizes, shapes at any multiple-of-16 input, train/eval behaviour, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkvunet_jax
from rwkvunet_jax.models import layers
from rwkvunet_jax.models.depthwise import depthwise_conv2d
from rwkvunet_jax.models.summary import model_macs, param_count

TINY = dict(depths=(1, 1, 2, 2), widths=(8, 16, 16, 32))

# Used-parameter counts of the official PyTorch models (docs/official-sizes.md).
OFFICIAL_COUNTS = [
    ("rwkv_unet_t", 1, 3, 3_145_761),
    ("rwkv_unet_s", 9, 1, 9_702_145),
    ("rwkv_unet_b", 9, 1, 17_125_713),
    ("rwkv_unet_encoder_t", 1000, 3, 3_099_792),
    ("rwkv_unet_encoder_s", 1000, 3, 9_609_432),
    ("rwkv_unet_encoder_b", 1000, 3, 16_935_520),
]


@pytest.mark.parametrize("name,num_classes,in_chans,expected", OFFICIAL_COUNTS)
def test_parameter_counts_equal_official_used_parameters(name, num_classes, in_chans, expected):
    model = nnx.eval_shape(lambda: rwkvunet_jax.create_model(name, num_classes=num_classes, in_chans=in_chans))
    assert param_count(model) == expected


def _jaxpr(module, x) -> str:
    """The jaxpr of ``module(x)``, as text (which primitives the layer uses)."""
    graphdef, state = nnx.split(module)
    return str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _abstract_output(model, shape):
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("name", rwkvunet_jax.list_models())
def test_output_shapes_every_model(name):
    # One abstract model per name (no weights drawn), traced at a square and a non-square size.
    model = nnx.eval_shape(lambda: rwkvunet_jax.create_model(name, num_classes=5, in_chans=1))
    for height, width in [(64, 64), (96, 64)]:
        out = _abstract_output(model, (2, height, width, 1))
        if "encoder" in name:
            assert out.shape == (2, 5)
        else:
            assert out.shape == (2, height, width, 5)
        assert out.dtype == jnp.float32


@pytest.mark.slow  # full-size model compiles (minutes on CI's 2 cores); run with -m slow
def test_real_forward_non_square_is_finite_and_eval_is_deterministic():
    model = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=3, in_chans=1, **TINY)
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 96, 64, 1))
    forward = nnx.jit(lambda m, x: m(x))
    y1, y2 = forward(model, x), forward(model, x)
    assert y1.shape == (2, 96, 64, 3)
    assert bool(jnp.all(jnp.isfinite(y1)))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


@pytest.mark.slow  # full-size model compiles (minutes on CI's 2 cores); run with -m slow
def test_single_channel_input_is_repeated_to_three():
    # Official S/B repeat a 1-channel input to 3 channels: same weights, same logits.
    one = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, in_chans=1, seed=3, **TINY)
    three = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, in_chans=3, seed=3, **TINY)
    one.eval(), three.eval()
    x = jax.random.normal(jax.random.key(1), (1, 32, 48, 1))
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(forward(one, x)), np.asarray(forward(three, jnp.repeat(x, 3, -1))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # full-size model compiles (minutes on CI's 2 cores); run with -m slow
def test_other_channel_counts_build_the_stem_for_them():
    model = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, in_chans=4, **TINY)
    assert model.encoder.stage0[0].conv.conv.kernel.shape == (1, 1, 4, 4)
    assert _abstract_output(model, (1, 32, 32, 4)).shape == (1, 32, 32, 2)


@pytest.mark.slow  # full-size model compiles (minutes on CI's 2 cores); run with -m slow
def test_every_parameter_gets_a_nonzero_gradient():
    model = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=3, in_chans=1, **TINY)
    # Non-zero decay/bonus so the WKV gradient paths are generic.
    for block in (model.encoder.stage3[1], model.encoder.stage4[1]):
        c = block.att.spatial_decay.shape[0]
        block.att.spatial_decay[...] = jnp.linspace(-1.0, 1.0, c)
        block.att.spatial_first[...] = jnp.linspace(0.5, -0.5, c)
    model.train()
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
    labels = jax.random.randint(jax.random.key(3), (2, 32, 32), 0, 3)
    # 32x32 gives 4 tokens in stage 3 and 1 in stage 4: enough for every WKV term.

    def loss_fn(m):
        logits = m(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param)))(model)
    flat = nnx.to_flat_state(grads)
    zero = ["/".join(map(str, path)) for path, value in flat if not bool(jnp.any(value[...] != 0))]
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert not zero, f"parameters with an all-zero gradient: {zero}"


@pytest.fixture(scope="module")
def tiny_encoder():
    """A tiny encoder with heavy drop path and one jitted forward: the train/eval tests share its two compiles."""
    model = rwkvunet_jax.create_model("rwkv_unet_encoder_t", num_classes=4, in_chans=3, drop_path_rate=0.9, **TINY)
    return model, nnx.jit(lambda m, x: m(x))


def test_batchnorm_statistics_move_only_in_train_mode(tiny_encoder):
    model, forward = tiny_encoder
    x = jax.random.normal(jax.random.key(4), (4, 16, 16, 3)) * 3 + 1
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    model.eval()
    forward(model, x)
    after_eval = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    jax.tree.map(np.testing.assert_array_equal, before, after_eval)
    model.train()
    forward(model, x)
    after_train = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after_train))]
    assert all(changed)


def test_drop_path_is_random_in_train_and_off_in_eval(tiny_encoder):
    model, forward = tiny_encoder
    x = jax.random.normal(jax.random.key(5), (4, 16, 16, 3))
    model.train()
    assert not np.allclose(np.asarray(forward(model, x)), np.asarray(forward(model, x)))
    model.eval()
    np.testing.assert_array_equal(np.asarray(forward(model, x)), np.asarray(forward(model, x)))


@pytest.mark.slow  # full-size model compiles (minutes on CI's 2 cores); run with -m slow
def test_bfloat16_compute_keeps_float32_parameters():
    model = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, in_chans=1, dtype="bfloat16", **TINY)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    model.eval()
    y = nnx.jit(lambda m, x: m(x))(model, jax.random.normal(jax.random.key(6), (1, 32, 32, 1)))
    assert y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize(
    "shape,match",
    [
        ((32, 32, 1), "rank-4"),
        ((1, 32, 32, 3), "1 input channel"),
        ((1, 40, 32, 1), "multiples of 16"),
        ((1, 32, 8, 1), "multiples of 16"),
    ],
)
def test_bad_inputs_raise_clear_errors(shape, match):
    model = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, in_chans=1, **TINY)
    with pytest.raises(ValueError, match=match):
        model(jnp.ones(shape))


def test_integer_input_is_rejected():
    model = rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, in_chans=1, **TINY)
    with pytest.raises(ValueError, match="floating"):
        model(jnp.ones((1, 32, 32, 1), jnp.int32))


def test_bad_model_arguments_raise():
    with pytest.raises(ValueError, match="unknown model"):
        rwkvunet_jax.create_model("rwkv_unet_xl", num_classes=2)
    with pytest.raises(ValueError, match="unknown override"):
        rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="wkv_variant"):
        rwkvunet_jax.create_model("rwkv_unet_t", num_classes=2, wkv_variant="v6")
    with pytest.raises(ValueError, match="num_classes"):
        rwkvunet_jax.create_model("rwkv_unet_t", num_classes=0)


def _q_shift_reference(x_nchw: np.ndarray) -> np.ndarray:
    """The official q_shift, written from the fact sheet on an NCHW array."""
    b, c, h, w = x_nchw.shape
    out = np.zeros_like(x_nchw)
    g = [int(c / 4), int(c / 2), int(3 * c / 4), c]
    out[:, 0:g[0], :, 1:] = x_nchw[:, 0:g[0], :, :-1]
    out[:, g[0]:g[1], :, :-1] = x_nchw[:, g[0]:g[1], :, 1:]
    out[:, g[1]:g[2], 1:, :] = x_nchw[:, g[1]:g[2], :-1, :]
    out[:, g[2]:g[3], :-1, :] = x_nchw[:, g[2]:g[3], 1:, :]
    return out


@pytest.mark.parametrize("channels", [4, 7, 13])
def test_q_shift_matches_official_semantics(channels):
    x = np.random.default_rng(0).normal(size=(2, 3, 5, channels)).astype(np.float32)
    ours = np.asarray(layers.q_shift(jnp.asarray(x)))
    ref = _q_shift_reference(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ours, ref)


def test_bilinear_resize_matches_half_pixel_reference():
    # Independent reference: PyTorch's align_corners=False source coordinate, clamped, no antialias.
    def ref(img, out_h, out_w):
        h, w = img.shape
        def coords(n_out, n_in):
            src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
            i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
            i1 = np.minimum(i0 + 1, n_in - 1)
            return i0, i1, src - i0
        y0, y1, fy = coords(out_h, h)
        x0, x1, fx = coords(out_w, w)
        top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
        bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
        return top * (1 - fy[:, None]) + bot * fy[:, None]

    img = np.random.default_rng(1).normal(size=(8, 12)).astype(np.float32)
    for out_h, out_w in [(16, 24), (32, 48), (2, 3), (4, 6)]:
        ours = np.asarray(layers.resize_bilinear(jnp.asarray(img)[None, :, :, None], out_h, out_w))[0, :, :, 0]
        np.testing.assert_allclose(ours, ref(img, out_h, out_w), rtol=1e-5, atol=1e-5)


def test_stride_two_depthwise_padding_is_symmetric_like_pytorch():
    conv = layers.Conv2d(1, 1, 5, stride=2, rngs=nnx.Rngs(0))
    conv.kernel[...] = jnp.ones((5, 5, 1, 1))
    x = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
    y = np.asarray(conv(x))[0, :, :, 0]
    padded = np.pad(np.asarray(x)[0, :, :, 0], 2)  # PyTorch: padding=2 on both sides
    ref = np.array([[padded[2 * i:2 * i + 5, 2 * j:2 * j + 5].sum() for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(y, ref)


# thop MACs of the official models (docs/official-sizes.md), and the paper's FLOPs.
@pytest.mark.parametrize(
    "name,num_classes,in_chans,size,thop_gmacs,paper_gflops",
    [
        pytest.param("rwkv_unet_encoder_t", 1000, 3, 224, 1.842, 1.9, marks=pytest.mark.slow),
        pytest.param("rwkv_unet_encoder_b", 1000, 3, 224, 8.994, 9.0, marks=pytest.mark.slow),
        pytest.param("rwkv_unet_b", 9, 1, 224, 11.173, 11.22, marks=pytest.mark.slow),
        ("rwkv_unet_t", 1, 3, 256, 3.744, 3.78),
    ],
)
def test_flops_follow_the_paper_convention(name, num_classes, in_chans, size, thop_gmacs, paper_gflops):
    # Abstract parameters: counting needs shapes only (drawing the weights of a full model costs far more).
    model = nnx.eval_shape(lambda: rwkvunet_jax.create_model(name, num_classes=num_classes, in_chans=in_chans))
    macs = model_macs(model, size, size)
    total = sum(macs.values()) / 1e9
    if "encoder" in name:
        # thop sees every operation of the encoder: exact agreement.
        assert total == pytest.approx(thop_gmacs, abs=5e-4)
    else:
        # The paper also charges the CCM's F.interpolate calls, which thop cannot see.
        assert thop_gmacs < total <= paper_gflops * 1.001
        assert total == pytest.approx(paper_gflops, rel=0.01)


@pytest.mark.parametrize(
    "channels,kernel,stride,height,width",
    [(6, 5, 2, 16, 12), (4, 3, 2, 8, 8), (5, 9, 1, 12, 8), (3, 5, 1, 7, 9), (4, 5, 2, 9, 11), (2, 3, 1, 1, 1)],
)
def test_cpu_depthwise_path_equals_lax_conv(channels, kernel, stride, height, width):
    # On CPU, depth-wise convs run as shifted-slice sums with a hand-written gradient; they must be the same
    # function as lax's grouped convolution (the independent reference), values and both gradients, also for
    # odd sizes where the stride leaves rows of the padding unused.
    conv = layers.Conv2d(channels, channels, kernel, stride=stride, groups=channels, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, height, width, channels))
    # On CPU the layer does not call lax's convolution at all.
    assert ("conv_general_dilated" not in _jaxpr(conv, x)) == (jax.default_backend() == "cpu")

    graphdef, state = nnx.split(conv)

    def loss(state, x, via_lax):
        module = nnx.merge(graphdef, state)
        y = nnx.Conv.__call__(module, x) if via_lax else module(x)
        return jnp.sum(jnp.sin(3.0 * y))

    ours = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(state, x, False)
    ref = jax.value_and_grad(loss, argnums=(0, 1))(state, x, True)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_cpu_depthwise_bfloat16_accumulates_in_float32():
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 8)).astype(jnp.bfloat16)
    kernel = (jax.random.normal(jax.random.key(2), (9, 9, 8)) * 0.1).astype(jnp.bfloat16)
    pads = ((4, 4), (4, 4))
    half = depthwise_conv2d(x, kernel, 1, pads)
    assert half.dtype == jnp.bfloat16
    # The same bf16 inputs summed in float32, rounded once: within half a bf16 ulp (2^-9 relative). Summing the
    # 81 products in bf16 would be off by many ulps.
    exact = depthwise_conv2d(x.astype(jnp.float32), kernel.astype(jnp.float32), 1, pads)
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(exact), rtol=2.0**-8, atol=1e-6)
    with pytest.raises(ValueError, match="kernel"):
        depthwise_conv2d(x, kernel[..., :4], 1, pads)


def test_pointwise_conv_equals_lax_conv():
    conv = layers.Conv2d(6, 5, 1, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 8, 6, 6))
    assert "conv_general_dilated" not in _jaxpr(conv, x) and "dot_general" in _jaxpr(conv, x)  # a matrix product
    graphdef, state = nnx.split(conv)

    def loss(state, via_lax):
        module = nnx.merge(graphdef, state)
        y = nnx.Conv.__call__(module, x) if via_lax else module(x)
        return jnp.sum(jnp.cos(y))

    ours = jax.value_and_grad(loss)(state, False)
    ref = jax.value_and_grad(loss)(state, True)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
