"""Tests for kinetix.models: shapes, feature order, validation, bounds, NNX functional use."""

import dataclasses
import functools
import importlib
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import kinetix.kinetics as kk
from kinetix import models
from kinetix.models import (
    DEFAULT_LOWER,
    DEFAULT_UPPER,
    LOG_LOWER,
    Backbone,
    DirectNet,
    DoubleConv,
    FrameFeatureExtractor,
    KineticHead,
    KineticNet,
    UNet,
    build_model,
    params_to_frames,
)

# Tiny sizes shared by the tests (same shapes → the eager op cache is reused).
B, H, W = 2, 16, 16
N_EARLY, F = 3, 4
WIDTHS = (16, 32)
HIDDEN = (32, 16)
SMALL = Backbone(n_early=N_EARLY, features_per_frame=F, widths=WIDTHS, head_hidden=HIDDEN)


# Tests that compile kinetix.kinetics run faster with XLA's optimisations on; the rest are
# dominated by compiling many small eager ops (parameter init, layer calls), which is about twice
# as fast without them. Results are unaffected (the tolerances below are for float32).
_OPTIMISED = {
    "test_params_to_frames_matches_kk_per_subject",
    "test_gradients_finite_through_frames",
}


@pytest.fixture(autouse=True)
def _fast_compile(request):
    prev = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", request.function.__name__ not in _OPTIMISED)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", prev)


def _frames(seed=0, t=N_EARLY):
    return jax.random.uniform(jax.random.key(seed), (B, H, W, t), minval=0.0, maxval=5.0)


@functools.cache
def _default_kinetic_net():
    return KineticNet(SMALL, rngs=nnx.Rngs(0))


def _kinetic_net():
    """A fresh copy of one tiny KineticNet (initialised once: eager init is slow on CPU)."""
    return nnx.clone(_default_kinetic_net())


def _zero_final_kernel(head, bias):
    head.out.kernel[...] = jnp.zeros_like(head.out.kernel[...])
    head.out.bias[...] = jnp.asarray(bias, jnp.float32)


# --- U-Net -------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [(16, 32), (16, 32, 64)])
def test_unet_output_shape(widths):
    unet = UNet(1, 5, widths, residual=True, rngs=nnx.Rngs(0))
    y = unet(jnp.ones((B, H, W, 1)))
    assert y.shape == (B, H, W, 5)
    assert np.all(np.isfinite(np.asarray(y)))


def _milesial_param_count(widths, in_ch, out_features, residual):
    """Closed-form parameter count of the spec (3×3 convs without bias, GN scale+bias)."""

    def double_conv(i, o):
        n = 9 * i * o + 9 * o * o + 2 * (2 * o)
        return n + (i * o if residual and i != o else 0)

    n = double_conv(in_ch, widths[0])
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        n += double_conv(a, b)  # Down
        n += 4 * b * a + a + double_conv(2 * a, a)  # Up: ConvTranspose 2×2 with bias, DoubleConv
    return n + widths[0] * out_features + out_features  # 1×1 out conv with bias


@pytest.mark.parametrize("residual", [False, True])
def test_paper_unet_parameter_count(residual):
    unet = nnx.eval_shape(lambda: UNet(1, 10, residual=residual, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(unet, nnx.Param)))
    assert n == _milesial_param_count((64, 128, 256, 512, 1024), 1, 10, residual)
    if not residual:  # milesial UNet(n_channels=1, n_classes=10, bilinear=False) size
        assert 31.0e6 < n < 31.1e6
    # only Params: no BatchNorm statistics or other mutable state
    assert len(jax.tree.leaves(nnx.state(unet, nnx.Not(nnx.Param)))) == 0


@pytest.mark.parametrize("widths", [(16, 24), (16,), (0, 16), (16, -32), (16, 32.0)])
def test_unet_rejects_bad_widths(widths):
    with pytest.raises(ValueError, match="widths"):
        UNet(1, 10, widths, rngs=nnx.Rngs(0))


def test_unet_rejects_indivisible_size():
    unet = UNet(1, 5, (16, 32, 64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"10×16 is not divisible by 4"):
        unet(jnp.ones((1, 10, 16, 1)))
    with pytest.raises(ValueError, match="NHWC"):
        unet(jnp.ones((1, 16, 16, 2)))
    # also through jit: the check is on static shapes
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.jit(lambda s, x: nnx.merge(*s)(x))(nnx.split(unet), jnp.ones((1, 16, 18, 1)))


def _group_norm_ref(x, groups, scale, bias, eps=1e-5):
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(n, h, w, c) * scale + bias


def _conv_ref(x, kernel):
    """'SAME' cross-correlation, NHWC, kernel [kh, kw, in, out], stride 1 (odd kernels)."""
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i : i + x.shape[1], j : j + x.shape[2], :] @ kernel[i, j]
    return out


@pytest.mark.parametrize("in_ch", [1, 16])  # projected skip, identity skip
@pytest.mark.parametrize("residual", [False, True])
def test_double_conv_matches_numpy_reference(in_ch, residual):
    block = DoubleConv(in_ch, 16, residual, rngs=nnx.Rngs(1))
    # non-trivial GroupNorm affine parameters
    block.norm1.scale[...] = jnp.linspace(0.5, 1.5, 16)
    block.norm2.bias[...] = jnp.linspace(-0.3, 0.3, 16)
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, in_ch)), np.float64)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.state(block, nnx.Param))
    h = _conv_ref(x, p["conv1"]["kernel"])
    h = np.maximum(_group_norm_ref(h, 1, p["norm1"]["scale"], p["norm1"]["bias"]), 0.0)
    h = _group_norm_ref(
        _conv_ref(h, p["conv2"]["kernel"]), 1, p["norm2"]["scale"], p["norm2"]["bias"]
    )
    if residual:
        h = h + (x if in_ch == 16 else _conv_ref(x, p["skip"]["kernel"]))
    want = np.maximum(h, 0.0)
    got = block(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_residual_on_off_both_run_and_differ():
    x = _frames(3, t=1)[..., :1]
    y_res = UNet(1, 4, WIDTHS, residual=True, rngs=nnx.Rngs(0))(x)
    y_plain = UNet(1, 4, WIDTHS, residual=False, rngs=nnx.Rngs(0))(x)
    assert y_res.shape == y_plain.shape == (B, H, W, 4)
    assert np.all(np.isfinite(np.asarray(y_res))) and np.all(np.isfinite(np.asarray(y_plain)))
    assert np.max(np.abs(np.asarray(y_res - y_plain))) > 1e-3


# --- per-frame features --------------------------------------------------------------------------


def test_features_are_frame_major():
    fx = FrameFeatureExtractor(F, WIDTHS, True, rngs=nnx.Rngs(0))
    x = _frames(4)
    feats = np.asarray(fx(x))
    assert feats.shape == (B, H, W, N_EARLY * F)
    for t in range(N_EARLY):  # reference: loop the same U-Net over frames
        ref = np.asarray(fx.unet(x[..., t : t + 1]))
        np.testing.assert_allclose(feats[..., t * F : (t + 1) * F], ref, rtol=1e-5, atol=1e-5)
    # a change in frame 1 only changes channels F..2F-1
    x2 = x.at[..., 1].set(0.0)
    diff = np.abs(np.asarray(fx(x2)) - feats).max(axis=(0, 1, 2))
    assert np.all(diff[F : 2 * F] > 0) and np.all(diff[:F] == 0) and np.all(diff[2 * F :] == 0)


# --- head: bounds and init -------------------------------------------------------------------------


def test_scaled_sigmoid_respects_bounds_and_order():
    head = KineticHead(12, HIDDEN, rngs=nnx.Rngs(0))
    lo, hi = np.asarray(DEFAULT_LOWER), np.asarray(DEFAULT_UPPER)
    for scale in (1.0, 1e4, -1e4):
        x = scale * jax.random.normal(jax.random.key(5), (B, H, W, 12))
        p = np.asarray(head(x))
        assert p.shape == (B, H, W, 5)
        assert np.all(p >= lo) and np.all(p <= hi)
    # zero kernel: output = lower + (upper - lower) * sigmoid(bias), per parameter in order
    z = np.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    _zero_final_kernel(head, z)
    p = np.asarray(head(jnp.ones((B, H, W, 12))))
    want = lo + (hi - lo) / (1.0 + np.exp(-z))
    np.testing.assert_allclose(p, np.broadcast_to(want, p.shape), rtol=1e-6, atol=1e-7)
    _zero_final_kernel(head, np.full(5, 40.0))
    np.testing.assert_allclose(np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0], hi, rtol=1e-6)


def test_custom_bounds():
    bounds = ((0.0, 0.01, 0.02, 0.0, 0.0), (0.5, 1.5, 2.0, 0.5, 0.1))
    head = KineticHead(12, HIDDEN, bounds=bounds, rngs=nnx.Rngs(0))
    _zero_final_kernel(head, np.zeros(5))
    p = np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0]
    np.testing.assert_allclose(p, (np.asarray(bounds[0]) + np.asarray(bounds[1])) / 2, rtol=1e-6)


def test_log_scaled_sigmoid_formula_bounds_and_relative_steps():
    """exp(ln lo + (ln hi − ln lo)·σ(z)): in range, geometric mid-point at z = 0, and
    d ln p / dz = (ln hi − ln lo)·σ(z)(1 − σ(z)), the same relative step at any value."""
    head = KineticHead(12, HIDDEN, activation="log_scaled_sigmoid", rngs=nnx.Rngs(0))
    assert head.lower == LOG_LOWER and head.upper == DEFAULT_UPPER
    lo, hi = np.log(LOG_LOWER), np.log(DEFAULT_UPPER)
    for scale in (1.0, 1e4, -1e4):
        p = np.asarray(head(scale * jax.random.normal(jax.random.key(5), (B, H, W, 12))))
        assert np.all(p >= np.asarray(LOG_LOWER) * (1 - 1e-6))
        assert np.all(p <= np.asarray(DEFAULT_UPPER) * (1 + 1e-6))
    z = np.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    _zero_final_kernel(head, z)
    p = np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0]
    np.testing.assert_allclose(p, np.exp(lo + (hi - lo) / (1.0 + np.exp(-z))), rtol=1e-6)
    _zero_final_kernel(head, np.zeros(5))
    mid = np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0]
    np.testing.assert_allclose(mid, np.sqrt(np.asarray(LOG_LOWER) * DEFAULT_UPPER), rtol=1e-6)
    # Relative slope, by jax.grad, against the closed form at a small and a large k3.
    for zk in (-3.0, 2.0):
        g = jax.grad(
            lambda t: jnp.log(
                models.bound_outputs(t, "log_scaled_sigmoid", LOG_LOWER, DEFAULT_UPPER)[3]
            )
        )
        s = 1.0 / (1.0 + np.exp(-zk))
        got = float(g(jnp.full(5, zk))[3])
        np.testing.assert_allclose(got, (hi[3] - lo[3]) * s * (1 - s), rtol=1e-5)


def test_log_scaled_sigmoid_init_params_and_validation():
    want = (0.05, 0.1, 0.2, 0.009, 0.005)
    head = KineticHead(
        12, HIDDEN, activation="log_scaled_sigmoid", init_params=want, rngs=nnx.Rngs(0)
    )
    _zero_final_kernel(head, head.out.bias[...])
    np.testing.assert_allclose(np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0], want, rtol=1e-5)
    with pytest.raises(ValueError, match="needs lower bounds > 0"):
        KineticHead(
            12,
            HIDDEN,
            activation="log_scaled_sigmoid",
            bounds=(DEFAULT_LOWER, DEFAULT_UPPER),
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="strictly inside"):
        KineticHead(
            12,
            HIDDEN,
            activation="log_scaled_sigmoid",
            init_params=(0.5, 1.0, 1.0, 5e-5, 0.01),
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="needs activation 'scaled_sigmoid'"):
        KineticNet(
            SMALL, activation="log_scaled_sigmoid", parameterization="macro", rngs=nnx.Rngs(0)
        )


def test_hardsigmoid_range_and_formula():
    head = KineticHead(12, HIDDEN, activation="hardsigmoid", rngs=nnx.Rngs(0))
    for scale in (1.0, 1e4, -1e4):
        p = np.asarray(head(scale * jax.random.normal(jax.random.key(6), (B, H, W, 12))))
        assert np.all(p >= 0.0) and np.all(p <= 1.0)
    _zero_final_kernel(head, [-4.0, -1.5, 0.0, 1.5, 4.0])
    p = np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0]
    np.testing.assert_allclose(p, [0.0, 0.25, 0.5, 0.75, 1.0], rtol=0, atol=1e-7)  # relu6(z+3)/6


@pytest.mark.parametrize("activation", ["scaled_sigmoid", "hardsigmoid"])
def test_initial_parameters_mid_range_or_requested(activation):
    head = KineticHead(12, HIDDEN, activation=activation, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(head.out.bias[...]), np.zeros(5))
    _zero_final_kernel(head, head.out.bias[...])
    mid = np.asarray(DEFAULT_UPPER) / 2 if activation == "scaled_sigmoid" else np.full(5, 0.5)
    np.testing.assert_allclose(np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0], mid, rtol=1e-6)
    want = (0.05, 0.1, 0.15, 0.05, 0.01)
    head = KineticHead(12, HIDDEN, activation=activation, init_params=want, rngs=nnx.Rngs(0))
    _zero_final_kernel(head, head.out.bias[...])
    np.testing.assert_allclose(np.asarray(head(jnp.ones((B, H, W, 12))))[0, 0, 0], want, rtol=1e-5)


def test_head_validation():
    with pytest.raises(ValueError, match="activation"):
        KineticHead(12, HIDDEN, activation="sigmoid", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of 16"):
        KineticHead(12, (24,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lower < upper"):
        KineticHead(12, HIDDEN, bounds=((0,) * 5, (1, 2, 0, 1, 1)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="only to activation='scaled_sigmoid'"):
        KineticHead(
            12, HIDDEN, activation="hardsigmoid", bounds=((0,) * 5, (1,) * 5), rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="strictly inside"):
        KineticHead(12, HIDDEN, init_params=(0.5, 1.0, 1.0, 0.5, 0.3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bounds must be given"):
        KineticHead(12, HIDDEN, n_params=4, rngs=nnx.Rngs(0))


# --- backbone config ---------------------------------------------------------------------------


def test_backbone_defaults_are_the_papers_and_values_are_normalised():
    paper = Backbone()
    assert (paper.n_early, paper.features_per_frame, paper.n_curve) == (22, 10, 0)
    assert paper.widths == (64, 128, 256, 512, 1024) and paper.head_hidden == (256, 128, 128, 64)
    assert paper.residual is True and paper.dtype is None and paper.head_inputs == 220
    b = Backbone(widths=[16, 32], head_hidden=[], n_early=np.int64(3), dtype="bfloat16")
    assert b.widths == (16, 32) and b.head_hidden == () and type(b.n_early) is int
    assert b.dtype == jnp.bfloat16 and b == Backbone(
        widths=(16, 32), head_hidden=(), n_early=3, dtype=jnp.bfloat16
    )
    assert hash(b) == hash(Backbone(widths=(16, 32), head_hidden=(), n_early=3, dtype="bfloat16"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.n_early = 4


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_early", 0, "n_early must be a positive integer"),
        ("n_early", 2.0, "n_early must be a positive integer"),
        ("features_per_frame", True, "features_per_frame must be a positive integer"),
        ("widths", (16,), "widths needs at least 2 entries"),
        ("widths", (16, 24), "widths entry .*multiple of 16"),
        ("widths", 64, "widths must be a sequence"),
        ("residual", "yes", "residual must be True or False"),
        ("head_hidden", (32, 8), "head_hidden entry .*multiple of 16"),
        ("n_curve", -1, "n_curve must be an integer >= 0"),
        ("dtype", "int32", "dtype must be None or a floating dtype"),
        ("dtype", "float17", "dtype must be None or a floating dtype"),
    ],
)
def test_backbone_rejects_each_invalid_field_in_one_sentence(field, value, message):
    with pytest.raises(ValueError, match=f"^Backbone {message}"):
        Backbone(**{field: value})


def test_backbone_from_config_reads_every_field_from_the_config():
    """configs/smoke.py's model section gives its own backbone (curve_frames → n_curve); each
    missing key is an error naming that key."""
    cfg = importlib.import_module("configs.smoke").get_config().model
    cfg.curve_frames = 28
    b = Backbone.from_config(cfg)
    assert b == Backbone(
        n_early=22, features_per_frame=2, widths=(16, 32), residual=True, head_hidden=(16,),
        n_curve=28, dtype="float32",
    )  # fmt: skip
    assert Backbone.from_config(_default_model()) == dataclasses.replace(
        models.PAPER_BACKBONE, dtype="float32"
    )
    keys = ("n_early", "features_per_frame", "widths", "residual", "head_hidden", "curve_frames")
    for key in (*keys, "dtype"):
        fields = cfg.to_dict()
        del fields[key]
        with pytest.raises(ValueError, match=f"missing the required field '{key}'"):
            Backbone.from_config(types.SimpleNamespace(**fields))
    with pytest.raises(ValueError, match="Backbone widths entry"):
        Backbone.from_config(_model_config(widths=(16, 20)))


def _expected_param_shapes(n_out):
    """NNX Param paths and shapes of a net on `SMALL` with n_curve = 5 (residual blocks), written
    from the architecture: the names checkpoints are stored under."""
    unet = {
        "inc/conv1/kernel": (3, 3, 1, 16),
        "inc/conv2/kernel": (3, 3, 16, 16),
        "inc/skip/kernel": (1, 1, 1, 16),
        "downs/0/conv/conv1/kernel": (3, 3, 16, 32),
        "downs/0/conv/conv2/kernel": (3, 3, 32, 32),
        "downs/0/conv/skip/kernel": (1, 1, 16, 32),
        "ups/0/up/kernel": (2, 2, 32, 16),
        "ups/0/up/bias": (16,),
        "ups/0/conv/conv1/kernel": (3, 3, 32, 16),
        "ups/0/conv/conv2/kernel": (3, 3, 16, 16),
        "ups/0/conv/skip/kernel": (1, 1, 32, 16),
        "outc/kernel": (1, 1, 16, F),
        "outc/bias": (F,),
    }
    for block, width in (("inc", 16), ("downs/0/conv", 32), ("ups/0/conv", 16)):
        for norm in ("norm1", "norm2"):
            unet |= {f"{block}/{norm}/scale": (width,), f"{block}/{norm}/bias": (width,)}
    head = {
        "layers/0/kernel": (N_EARLY * F + 5, 32),
        "layers/0/bias": (32,),
        "norms/0/scale": (32,),
        "norms/0/bias": (32,),
        "layers/1/kernel": (32, 16),
        "layers/1/bias": (16,),
        "norms/1/scale": (16,),
        "norms/1/bias": (16,),
        "out/kernel": (16, n_out),
        "out/bias": (n_out,),
    }
    return {f"features/unet/{k}": v for k, v in unet.items()} | {
        f"head/{k}": v for k, v in head.items()
    }


@pytest.mark.parametrize("kind", ["kinetic", "direct"])
def test_param_tree_paths_and_shapes_of_a_small_backbone(kind):
    backbone = dataclasses.replace(SMALL, n_curve=5)
    if kind == "kinetic":
        net = nnx.eval_shape(lambda: KineticNet(backbone, rngs=nnx.Rngs(0)))
    else:
        net = nnx.eval_shape(lambda: DirectNet(backbone, n_late=6, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(net))
    got = {"/".join(map(str, path)): tuple(v.shape) for path, v in flat}
    assert all(isinstance(v, nnx.Param) for _, v in flat)  # no other state
    assert got == _expected_param_shapes(5 if kind == "kinetic" else 6)
    assert net.backbone is backbone and (net.n_early, net.n_curve) == (N_EARLY, 5)
    with pytest.raises(ValueError, match="backbone must be a kinetix.models.Backbone"):
        models.EarlyFramesNet(dict(n_early=N_EARLY), n_out=5, rngs=nnx.Rngs(0))


# --- full networks ----------------------------------------------------------------------------------


def test_kinetic_net_shapes_and_validation():
    net = _kinetic_net()
    p = net(_frames())
    assert p.shape == (B, H, W, 5) and p.dtype == jnp.float32
    with pytest.raises(ValueError, match="3 early frames"):
        net(_frames(t=4))
    with pytest.raises(ValueError, match="not 'none'"):
        KineticNet(activation="none", rngs=nnx.Rngs(0))


def test_curve_inputs_join_every_voxels_features_before_the_head():
    """n_curve = C: the head sees [U-Net features, the example's C curve values] at every voxel
    (checked against the head applied to that concatenation by hand); a missing, misshapen or
    unexpected curve is a clear error."""
    net = KineticNet(dataclasses.replace(SMALL, n_curve=5), rngs=nnx.Rngs(0))
    x = _frames(3)
    curve = jnp.asarray(np.random.default_rng(1).uniform(0.1, 4.0, (B, 5)), jnp.float32)
    got = np.asarray(net(x, curve))
    feats = net.features(x)
    tiled = np.broadcast_to(np.asarray(curve)[:, None, None, :], (B, H, W, 5))
    want = np.asarray(net.head(jnp.concatenate([feats, jnp.asarray(tiled)], axis=-1)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    other = np.asarray(net(x, curve[::-1]))  # the examples' curves swapped
    assert np.max(np.abs(other - got)) > 1e-4
    with pytest.raises(ValueError, match=r"needs a curve of shape \[2, 5\].*got None"):
        net(x)
    with pytest.raises(ValueError, match=r"needs a curve of shape \[2, 5\].*got \(2, 4\)"):
        net(x, curve[:, :4])
    with pytest.raises(ValueError, match="built without curve inputs"):
        _kinetic_net()(x, curve)
    with pytest.raises(ValueError, match="n_curve must be an integer >= 0"):
        dataclasses.replace(SMALL, n_curve=-1)


def test_uncoupled_parameterization_outputs_rates_with_k1v_inside_the_bounds():
    """parameterization='uncoupled': the head's bounded outputs are (fv, (1 − fv)·K1, k2, k3,
    k4) within the rate bounds; the net returns the rates and starts at the requested ones."""
    net = KineticNet(SMALL, parameterization="uncoupled", rngs=nnx.Rngs(0))
    lo, hi = np.asarray(DEFAULT_LOWER), np.asarray(DEFAULT_UPPER)
    for scale in (1.0, 1e3, -1e3):
        x = _frames(4) * scale
        rates = np.asarray(net(x), np.float64)
        head = np.asarray(net.head(net.features(x)), np.float64)
        assert np.all(head >= lo) and np.all(head <= hi)
        fv, k1 = rates[..., 0], rates[..., 1]
        np.testing.assert_allclose((1 - fv) * k1, head[..., 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(rates[..., [0, 2, 3, 4]], head[..., [0, 2, 3, 4]])
    want = (0.05, 0.1, 0.2, 0.05, 0.005)
    net = KineticNet(SMALL, parameterization="uncoupled", init_params=want, rngs=nnx.Rngs(0))
    _zero_final_kernel(net.head, net.head.out.bias[...])
    np.testing.assert_allclose(np.asarray(net(_frames()))[1, 2, 3], want, rtol=1e-5)
    assert (
        build_model(_model_config(parameterization="uncoupled"), rngs=0).parameterization
        == "uncoupled"
    )


def test_macro_parameterization_outputs_rates_inside_the_macro_bounds():
    """parameterization='macro': the head's bounded outputs are (fv, K1, Vd, E, k4); the net
    returns rates with K1/(k2 + k3) = Vd and k3/(k2 + k3) = E inside their bounds, starts at
    the requested initial rates, and refuses settings where Vd could reach 0."""
    net = KineticNet(SMALL, parameterization="macro", rngs=nnx.Rngs(0))
    assert net.head.lower == models.MACRO_LOWER and net.head.upper == models.MACRO_UPPER
    lo, hi = np.asarray(models.MACRO_LOWER), np.asarray(models.MACRO_UPPER)
    for scale in (1.0, 1e3, -1e3):
        x = _frames(4) * scale
        rates = np.asarray(net(x), np.float64)
        macro = np.asarray(net.head(net.features(x)), np.float64)
        assert np.all(macro >= lo) and np.all(macro <= hi)
        fv, k1, k2, k3, k4 = np.moveaxis(rates, -1, 0)
        np.testing.assert_allclose(k1 / (k2 + k3), macro[..., 2], rtol=1e-5)
        np.testing.assert_allclose(k3 / (k2 + k3), macro[..., 3], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(rates[..., [0, 1, 4]], macro[..., [0, 1, 4]])
        np.testing.assert_array_equal(rates, net.from_preactivations(net.preactivations(x)))
    want = (0.05, 0.1, 0.2, 0.05, 0.005)  # soft tissue: Vd 0.4, E 0.2
    net = KineticNet(SMALL, parameterization="macro", init_params=want, rngs=nnx.Rngs(0))
    _zero_final_kernel(net.head, net.head.out.bias[...])
    np.testing.assert_allclose(np.asarray(net(_frames()))[1, 2, 3], want, rtol=1e-5)
    with pytest.raises(ValueError, match="needs activation 'scaled_sigmoid'"):
        KineticNet(SMALL, parameterization="macro", activation="hardsigmoid", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parameterization must be one of"):
        KineticNet(SMALL, parameterization="hybrid", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lower Vd > 0"):
        KineticNet(
            SMALL, parameterization="macro", bounds=((0.0,) * 5, (1.0,) * 5), rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="need K1 > 0 and k2 . k3 > 0"):
        KineticNet(
            SMALL, parameterization="macro", init_params=(0.1, 0.0, 0.2, 0.0, 0.0),
            rngs=nnx.Rngs(0),
        )  # fmt: skip


def test_preactivations_are_the_head_outputs_before_the_scaled_sigmoid():
    """net(f) == net.from_preactivations(net.preactivations(f)), and the bounded outputs are
    lower + (upper − lower) · sigmoid(z) of the pre-activations (float64 reference)."""
    net = _kinetic_net()
    x = _frames(3)
    z = net.preactivations(x)
    assert z.shape == (B, H, W, 5)
    out = np.asarray(net(x))
    np.testing.assert_array_equal(out, net.from_preactivations(z))
    lo, hi = np.asarray(DEFAULT_LOWER), np.asarray(DEFAULT_UPPER)
    want = lo + (hi - lo) / (1.0 + np.exp(-np.asarray(z, np.float64)))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


def test_direct_net_is_unbounded_with_n_late_outputs():
    net = DirectNet(SMALL, n_late=6, rngs=nnx.Rngs(0))
    assert net.head.activation == "none"
    y = net(_frames())
    assert y.shape == (B, H, W, 6)
    _zero_final_kernel(net.head, np.linspace(-7.0, 9.0, 6))  # raw outputs, no activation
    np.testing.assert_allclose(
        np.asarray(net(_frames()))[1, 3, 4], np.linspace(-7.0, 9.0, 6), rtol=1e-6
    )


def test_split_merge_roundtrip_under_jit():
    net = _kinetic_net()
    x = _frames(7)
    eager = np.asarray(net(x))
    graphdef, state = nnx.split(net)

    @jax.jit
    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_allclose(np.asarray(apply(state, x)), eager, rtol=1e-5, atol=1e-6)
    # the abstract model (e.g. for checkpoint restore targets) has the same state structure
    abstract = nnx.eval_shape(lambda: KineticNet(SMALL, rngs=nnx.Rngs(1)))
    assert jax.tree.structure(nnx.state(abstract)) == jax.tree.structure(state)
    # state is a pure pytree of Params; merging again gives an identical model
    again = nnx.merge(graphdef, jax.tree.map(jnp.array, state))
    np.testing.assert_array_equal(np.asarray(again(x)), eager)


def _batched_feng():
    base = np.asarray(kk.FENG_FDG, np.float32)
    amp = np.array([[1.0], [0.6]], np.float32)
    p = np.tile(base, (B, 1))
    p[:, :3] *= amp  # a different input amplitude per subject
    return p


def test_params_to_frames_matches_kk_per_subject():
    lo, hi = np.asarray(DEFAULT_LOWER), np.asarray(DEFAULT_UPPER)
    u = np.asarray(jax.random.uniform(jax.random.key(8), (B, 4, 4, 5)))
    params = jnp.asarray(lo + (hi - lo) * u, jnp.float32)  # parameters within the default bounds
    feng = jnp.asarray(_batched_feng())
    sched = kk.PAPER_SCHEDULE

    @jax.jit
    def batched(params, feng):
        inp = kk.FengInput(feng)
        return (
            params_to_frames(params, inp, sched),
            params_to_frames(params, inp, sched, point_samples=True),
            params_to_frames(params, inp, sched, decay_constant=0.0),
        )

    @jax.jit
    def reference(p, f):  # one subject, straight from kinetix.kinetics
        inp = kk.FengInput(f)
        return kk.pet_frames(p, inp, sched), kk.tissue_curve(p, inp, sched.start)

    got, got_pt, no_decay = (np.asarray(a) for a in batched(params, feng))
    assert got.shape == got_pt.shape == (B, 4, 4, sched.n_frames)
    for b in range(B):
        want, want_pt = reference(params[b], feng[b])
        np.testing.assert_allclose(got[b], np.asarray(want), rtol=1e-5, atol=1e-6)
        # the authors' variant: C_PET at frame starts, no decay
        np.testing.assert_allclose(got_pt[b], np.asarray(want_pt), rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got[1] - got[0])) > 1e-3  # the two subjects' inputs differ
    assert np.max(np.abs(no_decay - got)) > 1e-3


def test_gradients_finite_through_frames():
    net = _kinetic_net()
    graphdef, state = nnx.split(net)
    x = _frames(9)
    inp = kk.FengInput(jnp.asarray(_batched_feng()))
    target = jnp.ones((B, H, W, 6))

    def loss(state):
        params = nnx.merge(graphdef, state)(x)
        frames = params_to_frames(params, inp, kk.PAPER_SCHEDULE)
        return jnp.mean((frames[..., -6:] - target) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


# --- factory -----------------------------------------------------------------------------------------


def _default_model():
    """``config.model`` of configs/default.py (an `ml_collections.ConfigDict`)."""
    return importlib.import_module("configs.default").get_config().model


def _model_config(**overrides) -> ml_collections.ConfigDict:
    """The default model section with the tiny test backbone and ``overrides``."""
    cfg = _default_model()
    cfg.update(
        dict(n_early=N_EARLY, features_per_frame=F, widths=WIDTHS, head_hidden=HIDDEN) | overrides
    )
    return cfg


def test_build_model_from_config_objects():
    cfg = _model_config(
        kind="kinetic",
        residual=False,
        activation="scaled_sigmoid",
        bounds_lower=(0.0,) * 5,
        bounds_upper=(0.5, 1.0, 1.0, 0.5, 0.1),
    )
    net = build_model(cfg, rngs=0)
    assert isinstance(net, KineticNet)
    assert net.head.upper == (0.5, 1.0, 1.0, 0.5, 0.1)
    assert net.features.unet.residual is False
    assert net.backbone == dataclasses.replace(SMALL, residual=False, dtype="float32")
    assert net(_frames()).shape == (B, H, W, 5)

    cfg.parameterization = "macro"
    cfg.macro_bounds_lower, cfg.macro_bounds_upper = (0.0, 0.0, 0.1, 0.0, 0.0), (1, 2, 1, 1, 0.1)
    macro = build_model(cfg, rngs=0)
    assert macro.parameterization == "macro" and macro.head.lower == (0.0, 0.0, 0.1, 0.0, 0.0)
    assert macro.head.upper == (1.0, 2.0, 1.0, 1.0, 0.1)
    cfg.parameterization = "rates"

    cfg.activation = "log_scaled_sigmoid"  # its own lower bounds, the same upper ones
    assert build_model(cfg, rngs=0).head.lower == LOG_LOWER
    cfg.log_bounds_lower = (1e-2, 1e-2, 1e-2, 1e-3, 1e-4)
    logb = build_model(cfg, rngs=0)
    assert logb.head.lower == (1e-2, 1e-2, 1e-2, 1e-3, 1e-4)
    assert logb.head.upper == (0.5, 1.0, 1.0, 0.5, 0.1)
    assert logb(_frames()).shape == (B, H, W, 5)

    cfg.activation = "hardsigmoid"  # bounds fields are ignored for the authors' activation
    assert build_model(cfg, rngs=nnx.Rngs(0)).head.activation == "hardsigmoid"

    ns = types.SimpleNamespace(**_model_config(kind="direct", n_late=6, dtype="bfloat16").to_dict())
    direct = build_model(ns, rngs=0)
    assert isinstance(direct, DirectNet)
    y = direct(_frames())
    assert y.shape == (B, H, W, 6) and y.dtype == jnp.bfloat16

    with pytest.raises(ValueError, match="'kind'"):
        build_model(types.SimpleNamespace(widths=WIDTHS), rngs=0)
    with pytest.raises(ValueError, match="'kind' must be one of"):
        build_model(types.SimpleNamespace(kind="patlak"), rngs=0)
    # every other field is read from the config, none restated here: a missing one is named
    for key in ("residual", "curve_frames", "dtype", "activation", "init_params", "bounds_upper"):
        fields = _model_config().to_dict()
        del fields[key]
        with pytest.raises(ValueError, match=f"missing the required field '{key}'"):
            build_model(types.SimpleNamespace(**fields), rngs=0)


def test_public_names():
    for name in models.__all__:
        assert hasattr(models, name), name


def test_direct_ablation_builds_from_the_default_config():
    """The kinetic head's 5 `init_params` must not leak into the 6-output direct ablation."""
    from configs import smoke

    config = smoke.get_config()
    config.model.kind = "direct"
    assert len(config.model.init_params) == 5
    net = build_model(config.model, rngs=0)
    assert isinstance(net, DirectNet)
    x = jnp.zeros((1, 16, 16, config.model.n_early), jnp.float32)
    assert net(x).shape == (1, 16, 16, 6)
