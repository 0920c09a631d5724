"""The whole policy of a sharded run (DeepSpeed ZeRO-3, FSDP2), gathered to rank 0 for saving.

Under ZeRO-3 and FSDP2 no process holds a whole weight, so rank 0 alone cannot save the final
policy that analysis pairs with the shards (the logit lens, dose-response and ablation read it).
``gathered_state_dict`` is a collective: every rank calls it at the end of training, in the same
order, and rank 0 gets the model's whole state dict on the CPU (the other ranks get None), through
the frameworks' own APIs:

- ZeRO-3: ``deepspeed.zero.GatheredParameters``, one parameter at a time, so a rank holds at most
  one whole weight beyond its own partition while gathering; tied weights are gathered once and
  stay one tensor in the state dict (``save_pretrained`` then writes them as it does unsharded);
- FSDP2: ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with a full state dict
  offloaded to rank 0's CPU.

Rank 0 holds the whole model in CPU memory once, as ``trainer.save_model`` with ZeRO-3's
``stage3_gather_16bit_weights_on_model_save`` does (of a LoRA policy, the adapter alone);
``ShardCallback(save_model=False)`` skips it.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_shards.capture import distributed
from sae_shards.capture.sharded_delta import is_dtensor
from sae_shards.capture.zero3_delta import is_zero3


def gathered_state_dict(model: torch.nn.Module,
                        trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole state dict of sharded ``model`` on rank 0's CPU, None on the other ranks
    (collective: every rank calls it, with the same ``trainable_only``). ``trainable_only``:
    only the parameters that train (a LoRA adapter's, which is all its ``save_pretrained``
    writes: a frozen base is never copied to rank 0). ``ValueError`` for a model that is not
    sharded."""
    params = list(model.parameters())
    if any(is_zero3(p) for p in params):
        return _zero3_state_dict(model, trainable_only)
    if any(is_dtensor(p) for p in params):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        return dict(state) if distributed.is_main() else None
    raise ValueError(f"{type(model).__name__} is not sharded (no ZeRO-3 or FSDP2 parameters): "
                     "rank 0 saves it whole")


def _zero3_state_dict(model: torch.nn.Module,
                      trainable_only: bool) -> dict[str, torch.Tensor] | None:
    from deepspeed.runtime.zero import GatheredParameters

    main = distributed.is_main()
    state: dict[str, Any] = model.state_dict(keep_vars=True)  # the same order on every rank
    if trainable_only:
        state = {k: t for k, t in state.items() if getattr(t, "requires_grad", False)}
    whole: dict[int, torch.Tensor] = {}
    for tensor in state.values():
        if is_zero3(tensor) and id(tensor) not in whole:  # a tied weight: gathered once
            with GatheredParameters([tensor], modifier_rank=None):
                whole[id(tensor)] = tensor.detach().to("cpu", copy=True) if main else None
    if not main:
        return None
    return {key: whole[id(t)] if id(t) in whole else t.detach().to("cpu", copy=True)
            for key, t in state.items()}
