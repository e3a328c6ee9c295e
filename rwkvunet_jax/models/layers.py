"""Basic layers of RWKV-UNet, NHWC, with the official code's conventions.

Attribute names follow the official PyTorch module names (``conv``, ``norm``, ``se.conv_reduce`` ...)
so that weight conversion is a walk over the state. Every layer that the paper's FLOP count charges
reports its MACs to :mod:`rwkvunet_jax.models.flops`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rwkvunet_jax.models import flops
from rwkvunet_jax.models.depthwise import depthwise_conv2d

Dtype = jnp.dtype | None

# PyTorch's default Conv2d/Linear init: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)) for the
# weight and U(+-1/sqrt(fan_in)) for the bias. In variance_scaling terms: scale 1/3, fan_in, uniform.
torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# timm's trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. ~100 std: a plain normal in practice.
trunc_normal_002 = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def _torch_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_padding(kernel_size: int, stride: int) -> int:
    """The official ``ceil((k - s) / 2)`` padding, applied on both sides (k=5, s=2 -> 2)."""
    return math.ceil((kernel_size - stride) / 2)


class Conv2d(nnx.Conv):
    """2-D convolution with PyTorch's symmetric padding and default init; counts its MACs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool = False,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        pad = torch_padding(kernel_size, stride)
        fan_in = (in_features // groups) * kernel_size * kernel_size
        super().__init__(
            in_features,
            out_features,
            kernel_size=(kernel_size, kernel_size),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_default_kernel_init,
            bias_init=_torch_bias_init(fan_in),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self._use_cpu_depthwise():
            y = self._cpu_depthwise(x)
        elif self._is_pointwise():
            y = self._pointwise(x)
        else:
            y = super().__call__(x)
        kh, kw = self.kernel_size
        flops.record("conv", math.prod(y.shape) * (self.in_features // self.feature_group_count) * kh * kw)
        return y

    def _use_cpu_depthwise(self) -> bool:
        # XLA:CPU runs one-channel-per-group convolutions and their gradients through generic code, 5-56x
        # slower than shifted-slice sums (benchmarks/depthwise_grad_cpu.py); they dominated CPU training.
        # GPUs and TPUs have real depth-wise kernels and keep lax.conv.
        depthwise = self.feature_group_count == self.in_features == self.out_features
        return depthwise and jax.default_backend() == "cpu"

    def _is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.strides == (1, 1) and self.feature_group_count == 1

    def _operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        bias = None if self.bias is None else self.bias[...].astype(dtype)
        return x.astype(dtype), self.kernel[...].astype(dtype), bias

    def _cpu_depthwise(self, x: jax.Array) -> jax.Array:
        """The depth-wise convolution as shifted-slice sums (:mod:`rwkvunet_jax.models.depthwise`)."""
        x, kernel, bias = self._operands(x)
        y = depthwise_conv2d(x, kernel[:, :, 0, :], self.strides[0], self.padding)
        return y if bias is None else y + bias

    def _pointwise(self, x: jax.Array) -> jax.Array:
        """A 1x1 convolution as a matrix product over channels (XLA:CPU turns the kernel gradient of a
        1x1 lax.conv into a convolution with an image-sized window; a dot is the same on every backend)."""
        x, kernel, bias = self._operands(x)
        y = jnp.dot(x, kernel[0, 0])
        return y if bias is None else y + bias


class Linear(nnx.Linear):
    """Linear layer (no bias unless asked: only the classifier head has one); counts its MACs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        kernel_init: Callable = torch_default_kernel_init,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=nnx.initializers.zeros_init(),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        flops.record("linear", math.prod(y.shape) * self.in_features)
        return y


class BatchNorm2d(nnx.BatchNorm):
    """BatchNorm with the official eps 1e-6 and PyTorch momentum 0.1 (Flax momentum 0.9).

    Flax keeps the biased batch variance in its running average where PyTorch keeps the unbiased
    one; the difference is a factor n/(n-1) with n = batch x height x width, a training-time detail.
    """

    def __init__(self, num_features: int, *, dtype: Dtype = None, rngs: nnx.Rngs):
        super().__init__(
            num_features, momentum=0.9, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        flops.record("norm", 4 * math.prod(x.shape))
        return super().__call__(x)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm over the last axis (eps 1e-5 for token norms, as PyTorch's default)."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype: Dtype = None, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        flops.record("norm", 4 * math.prod(x.shape))
        return super().__call__(x)


class LayerNorm2d(nnx.Module):
    """Channel LayerNorm at every pixel (eps 1e-6); in NHWC it is a LayerNorm over the last axis.

    The official module wraps ``nn.LayerNorm`` as ``.norm``; we keep that nesting for the names.
    """

    def __init__(self, num_features: int, *, dtype: Dtype = None, rngs: nnx.Rngs):
        self.norm = LayerNorm(num_features, epsilon=1e-6, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class ConvNormAct(nnx.Module):
    """Conv (no bias) -> optional BatchNorm -> optional activation (``conv.conv``, ``conv.norm``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: str | None = "relu",
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(
            in_features, out_features, kernel_size, stride=stride, groups=groups, dtype=dtype, rngs=rngs
        )
        self.norm = BatchNorm2d(out_features, dtype=dtype, rngs=rngs) if norm else None
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = _ACTIVATIONS[self.act](x)
        return x


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excitation with biased 1x1 convs; only the stem has one (SiLU inside)."""

    def __init__(self, channels: int, reduced: int, *, dtype: Dtype = None, rngs: nnx.Rngs):
        self.conv_reduce = Conv2d(channels, reduced, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.conv_expand = Conv2d(reduced, channels, 1, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = self.conv_expand(jax.nn.silu(self.conv_reduce(s)))
        return x * jax.nn.sigmoid(s)


class DropPath(nnx.Module):
    """Stochastic depth: zeroes whole samples of a residual branch with probability ``rate``.

    ``deterministic`` is switched by ``model.train()`` / ``model.eval()`` like ``nnx.Dropout``.
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = float(rate)
        self.deterministic = False
        self.rngs = rngs["dropout"].fork() if rate > 0 else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.rngs(), keep, mask_shape)
        return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of NHWC ``x`` like ``F.interpolate(..., 'bilinear', align_corners=False)``.

    Half-pixel centres and no antialiasing when shrinking (PyTorch has none), so 1/4 downsampling
    averages the two middle pixels of each 4-pixel cell exactly as PyTorch does.
    """
    if x.shape[1:3] == (height, width):
        return x
    out_shape = (x.shape[0], height, width, x.shape[3])
    flops.record("resize", 11 * math.prod(out_shape))
    return jax.image.resize(x, out_shape, method="bilinear", antialias=False).astype(x.dtype)


def q_shift(x: jax.Array) -> jax.Array:
    """The official token shift on an NHWC grid, in four channel groups (shift 1, gamma 1/4).

    Group 0 takes the left neighbour, group 1 the right, group 2 the one above, group 3 the one
    below; borders are zero. Boundaries are ``int(C/4), int(C/2), int(3C/4)`` as in the official code.
    """
    c = x.shape[-1]
    b1, b2, b3 = int(c / 4), int(c / 2), int(c * 3 / 4)
    g0, g1, g2, g3 = x[..., :b1], x[..., b1:b2], x[..., b2:b3], x[..., b3:]
    zero_w = ((0, 0), (0, 0), (1, 0), (0, 0))
    g0 = jnp.pad(g0[:, :, :-1], zero_w)  # out[w] = in[w-1]
    g1 = jnp.pad(g1[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))  # out[w] = in[w+1]
    g2 = jnp.pad(g2[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))  # out[h] = in[h-1]
    g3 = jnp.pad(g3[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))  # out[h] = in[h+1]
    return jnp.concatenate([g0, g1, g2, g3], axis=-1)
