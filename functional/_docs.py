"""Argument documentation shared by the update rules, written once and spliced in with ``%``."""

from collections.abc import Callable

DOCS = {
    "params": """params: parameters to update in place (float32, float16 or bfloat16; the local
            tensor of a DTensor). Parameters are read and written in their dtype, all math is fp32.
        grads: their gradients, same shapes and devices (any of the three float dtypes).""",
    "codes": """*_codes / *_absmax: the 8-bit states, updated in place: uint8 codes of the
            parameter's shape (contiguous) and float32 absmax of ceil(numel / block_size) blocks.
            Signed states index the signed dynamic map, non-negative ones the unsigned map
            (``eightbit.quant.get_codebook("dynamic", signed=...)``). A state list is ``None``
            when its feature is off.""",
    "lr": """lr: learning rate, a Python float or a 0-dim tensor.""",
    "maximize": """maximize: maximize the objective (the gradient is negated).""",
    "block_size": """block_size: elements per absmax block (power of two, 64 to 4096).""",
    "bf16_stochastic_rounding": """bf16_stochastic_rounding: write bfloat16 parameters with
            stochastic rounding (unbiased, so updates smaller than half a bfloat16 ulp are not
            lost on average; uses torch's default generator of the parameter's device). It has no
            effect on float32 and float16 parameters.""",
    "state_rule": """Requantizing the fresh states follows the nearest code, with two exceptions
    (issue 17; the torch path, the CPU kernels and the CUDA kernels all apply them, fp32 states
    keep torch's arithmetic):

    (a) An element any of whose fresh 8-bit states is NaN or +-inf gets 0.0 in every state. The
        codebook has no NaN code, and a non-finite value in a block's absmax would wipe the
        other elements' states. The parameter keeps what the fp32 rule computed: a NaN or inf
        gradient makes that one parameter NaN where torch.optim does, and a finite 1e30 gradient
        overflows a second moment to inf and leaves the parameter finite, as in torch.optim.
    (b) On the unsigned map a positive value whose nearest code is the code of zero is stored as
        the smallest positive code (index 1), so a positive second moment never decodes to 0.

    The bound that (b) buys: with codes :math:`c_j` and :math:`t_j` the threshold between
    :math:`c_j` and :math:`c_{j+1}`, one requantization keeps a positive value of the unsigned
    map at least :math:`\\rho = \\min_{j \\ge 1} c_j / t_j = 0.5345` times itself (or rounds it
    up), and grows a signed value by at most :math:`\\max c_{j+1} / t_j = 2.0` (at its smallest
    code; the sign is kept). Without (b), a rare embedding row's second moment could decode to 0
    next to its non-zero first moment, and its next step was about lr * m / eps.""",
    "chunks": """The torch path works in block-aligned chunks of 2^20 elements, so its temporary
    memory is bounded by the chunk, whatever the size of the parameter.""",
}


def fill(fn: Callable) -> Callable:
    """Splice the shared argument docs (``%(name)s``) into ``fn``'s docstring."""
    fn.__doc__ = fn.__doc__ % DOCS
    return fn
