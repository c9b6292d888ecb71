"""Run a script as a GPU machine's FSDP launch runs it, on CPU processes: `accelerate launch --config_file
examples/fsdp.yaml tests/fsdp_on_cpu.py train_dreambooth.py ...`.

accelerate turns an FSDP config into sharded training only on GPU-like devices (with CPUs it falls back to plain
data parallel, which the trainer refuses). torch's FSDP2 itself shards on CPU processes over gloo, so this marks
the processes as a GPU machine's before the script creates its Accelerator; everything after that is the real
FSDP path: accelerate's FSDP2 wrapping, sharded parameters, gathered saves."""

import os
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

PartialState(cpu=True)._shared_state["distributed_type"] = DistributedType.MULTI_GPU
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as if the script were run itself
runpy.run_path(sys.argv[0], run_name="__main__")
