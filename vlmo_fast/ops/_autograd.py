"""The backward decorator of the fused ops' autograd Functions."""

from __future__ import annotations

import functools

import torch

_MESSAGE = (b"vlmo_fast: a second derivative through a fused kernel op is not implemented (its first-order gradient "
            b"is not differentiable); run the op on backend='torch' for double backward, e.g. a gradient penalty")


def first_order_only(backward):
    """Like ``torch.autograd.function.once_differentiable``, but the error for a second derivative is keyed on the
    Function's inputs, not only on the incoming gradient.

    ``once_differentiable`` marks the gradients as not differentiable only when the incoming gradient requires grad.
    Under ``create_graph=True`` with an incoming gradient that does not (the gradient of ``out.sum()``, as in a
    gradient penalty), it returned the gradients as constants, and a second derivative through them was silently
    wrong (they depend on the saved inputs). Here, whenever the graph is being built and an input needs a gradient,
    every returned gradient carries an error that fires if it is differentiated. A plain ``backward()`` (no graph
    built) pays nothing."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or not any(ctx.needs_input_grad):
            return outputs
        single = not isinstance(outputs, tuple)
        outs = (outputs,) if single else outputs
        tensors = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
        if not tensors:
            return outputs
        delayed = torch._C._functions.DelayedError(_MESSAGE, len(tensors))
        marked = delayed(*[outs[i].detach().requires_grad_() for i in tensors])
        marked = (marked,) if isinstance(marked, torch.Tensor) else marked
        result = list(outs)
        for i, m in zip(tensors, marked):
            result[i] = m
        return result[0] if single else tuple(result)

    return wrapper
