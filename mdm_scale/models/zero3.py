"""ZeRO-3 helpers shared by building and loading the built-in model.

Under ZeRO-3 every parameter is partitioned over the ranks as soon as it is constructed (``zero.Init``).
Writing values into it (initialisation, loading a checkpoint) happens module by module inside
``GatheredParameters(modifier_rank=0)``: the module's parameters are gathered whole, rank 0's values are kept,
broadcast and partitioned again on exit. So at most one module (one embedding matrix, one projection) is ever
whole on a rank. Outside ZeRO-3 the gathering is a no-op and every rank writes its own copy.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from mdm_scale.models.modeling_mdm import Block


def parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Full (unpartitioned: ``ds_shape`` under ZeRO-3) shape of every parameter; identifies a model for
    checkpoint compatibility."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}


def gathered_modules(model: nn.Module) -> Iterator[tuple[nn.Module, list[tuple[str, nn.Parameter]]]]:
    """Each module that owns parameters, with ``(name, parameter)`` of those not yielded before (a tied
    parameter comes once), gathered whole for the body of the loop (see the module docstring)."""
    import deepspeed

    names = {id(p): name for name, p in model.named_parameters()}
    seen: set[int] = set()
    for module in model.modules():
        own = [(names[id(p)], p) for p in module.parameters(recurse=False) if id(p) not in seen]
        if own:
            seen.update(id(p) for _, p in own)
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                yield module, own


def set_block_leaves(model: nn.Module) -> None:
    """Make each transformer block one ZeRO-3 unit: its parameters are gathered together when the block runs,
    with one set of hooks per block instead of one per Linear (the per-module hooks cost host time that the
    GPU would otherwise wait for). Not with LoRA adapters: DeepSpeed 0.19 does not gather the adapters of such
    a block for its backward pass (``tests/test_lora.py`` trains at ZeRO-3), so they keep per-module hooks; the
    caller (``loading.build_model``) decides."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [Block])
