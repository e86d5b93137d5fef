"""FSDP2 through accelerate, on GPUs and on CPU processes alike, and whole states out of a sharded run.

`accelerate launch --config_file configs/accelerate/fsdp.yaml` asks for FSDP in the environment.
accelerate 1.15 turns it on only for GPU-type worlds: a world of CPU processes (gloo) silently
trains DDP instead. torch's FSDP2 shards over gloo as well, so `enable_fsdp_on_cpu` gives
accelerate the FSDP state it was asked for; that is how FSDP is tested here, without GPUs.

A sharded model holds a slice of each weight (and of the optimiser's moments) on each process.
Checkpoints stay whole and in one format whatever the world (the optimiser's state keyed by
parameter name), so a run saved under FSDP resumes on one process and the other way round: every
process takes part in the gather, the main process writes.
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


def whole_weights(model: torch.nn.Module) -> dict:
    """The model's weights on the CPU. Every process must call this: a sharded model's slices are
    gathered, and only the main process gets them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_whole())


def whole_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """`whole_weights`, and the optimiser's state keyed by parameter name, alike."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_whole())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put a saved optimiser state back; a sharded model's processes each keep their slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(key, int) for key in state["state"]):  # keyed by position: older checkpoints
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
