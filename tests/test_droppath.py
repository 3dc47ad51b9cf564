"""ops.drop_path (per-sample stochastic depth drawn like timm's): its draws and rescaling, drop_prob = 1, and its
argument checks."""

import pytest
import torch

from vlmo_fast import ops


@pytest.mark.parametrize("shape", [(7, 5, 3), (7,), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_drops_whole_samples_and_rescales_the_kept_ones(shape, dtype):
    x = torch.randn(shape).to(dtype).requires_grad_()
    state = torch.get_rng_state()
    out = ops.drop_path(x, 0.4, training=True)
    after = torch.rand(1)
    torch.set_rng_state(state)  # the official DropPath's arithmetic on the same draw, in x's dtype
    mask = (0.6 + torch.rand((shape[0],) + (1,) * (len(shape) - 1), dtype=dtype)).floor_()
    assert torch.equal(torch.rand(1), after)  # one draw of B numbers, as the official module makes
    assert out.dtype == dtype and torch.equal(out, x.div(0.6) * mask)
    g = torch.randn(shape).to(dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(gx, g.div(0.6) * mask)


def test_eval_and_zero_probability_are_the_identity_without_a_draw():
    x = torch.randn(4, 3)
    state = torch.get_rng_state()
    assert ops.drop_path(x, 0.4, training=False) is x
    assert ops.drop_path(x, 0.0, training=True) is x
    assert ops.drop_path(x, 1.0, training=False) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_probability_one_drops_every_sample_to_zeros_not_nan():
    """drop_prob = 1 keeps nothing: zeros and zero gradients (timm's drop_path skips the 1/keep rescaling when keep is
    0), where x / 0 · 0 gave NaN. The random stream still advances by the one draw of a DropPath call."""
    x = torch.randn(5, 3, 4, requires_grad=True)
    state = torch.get_rng_state()
    out = ops.drop_path(x, 1.0, training=True)
    after = torch.rand(1)
    torch.set_rng_state(state)
    torch.rand(5, 1, 1)
    assert torch.equal(torch.rand(1), after)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    (gx,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize(
    "args,err,match",
    [
        (([1.0, 2.0], 0.1, True), TypeError, "x must be a torch.Tensor, got list"),
        ((torch.ones(3, dtype=torch.int64), 0.1, True), TypeError,
         "x must have a floating-point dtype, got torch.int64"),
        ((torch.tensor(1.0), 0.1, True), ValueError, "x must be at least 1-D"),
        ((torch.ones(3), -0.5, True), ValueError, r"drop_prob must be in \[0, 1\], got -0.5"),
        ((torch.ones(3), 1.5, True), ValueError, r"drop_prob must be in \[0, 1\], got 1.5"),
        ((torch.ones(3), float("nan"), True), ValueError, r"drop_prob must be in \[0, 1\], got nan"),
        ((torch.ones(3), "0.1", True), TypeError, "drop_prob must be a real number, got str"),
        ((torch.ones(3), True, True), TypeError, "drop_prob must be a real number, got bool"),
        ((torch.ones(3), -0.5, False), ValueError, "drop_prob must be in"),  # checked in eval too
    ],
)
def test_rejects_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        ops.drop_path(*args)
