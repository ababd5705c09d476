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
    "chunks": """The torch path works in block-aligned chunks of 2^20 elements, so its temporary
    memory is bounded by the chunk, whatever the size of the parameter.""",
}


def fill(fn: Callable) -> Callable:
    """Splice the shared argument docs (``%(name)s``) into ``fn``'s docstring."""
    fn.__doc__ = fn.__doc__ % DOCS
    return fn
