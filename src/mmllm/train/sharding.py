"""FSDP2 through accelerate, on GPUs and on CPU processes alike, and whole states out of a sharded run.

`accelerate launch --config_file configs/accelerate/fsdp.yaml` asks for FSDP in the environment.
accelerate 1.15 turns it on only for GPU-type worlds: a world of CPU processes (gloo) silently
trains DDP instead. torch's FSDP2 shards over gloo as well, so `enable_fsdp_on_cpu` gives
accelerate the FSDP state it was asked for; that is how FSDP is tested here, without GPUs.

A sharded model holds a slice of each weight (and of the optimiser's moments) on each process.
Its checkpoints are whole, like any other run's: every process takes part in the gather (torch's
`get_state_dict`), the main process writes. Only sharded runs take that path: quantised (QLoRA)
weights do not pass through it. A run saved under FSDP resumes on one process and the other way round.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

FSDP_REQUESTED = "ACCELERATE_USE_FSDP"


def enable_fsdp_on_cpu(accelerator) -> None:
    """Make a multi-process CPU world shard with FSDP when the launch asked for it."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get(FSDP_REQUESTED, "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* variables
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # Both states: `prepare` reads the partial one.
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def held_parameters(model: torch.nn.Module) -> str:
    """How much of the model this process holds: all of it, unless sharded."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return f"this process holds {held:,} of {sum(p.numel() for p in params):,} parameters"


def _whole() -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def whole_weights(accelerator, model: torch.nn.Module) -> dict | None:
    """A sharded model's weights, gathered on the CPU (every process must call this; only the main
    process gets them). None when not sharded: the model's own state dict is whole."""
    if not accelerator.is_fsdp2:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_whole())


def whole_states(
    accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict | None, dict]:
    """`whole_weights`, and the optimiser's state: gathered and keyed by parameter name when sharded,
    else its own (keyed by position)."""
    if not accelerator.is_fsdp2:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_whole())


def load_optimizer_state(
    accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Put a saved optimiser state back, whichever world saved it; sharded, each process keeps its slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_position = all(isinstance(i, int) for group in state["param_groups"] for i in group["params"])
    if by_position and not accelerator.is_fsdp2:
        optimizer.load_state_dict(state)
        return
    if by_position:  # saved unsharded: name the parameters as torch's sharded loader wants them
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        state = {
            "state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
        }
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
