"""Getting weights in: HF folders and GGUF files as HF-named tensors, orbax save / restore.

Speaks file formats only; never imports engine or serving.
"""

from checkpoints.opener import open_checkpoint
from checkpoints.source import Checkpoint, CheckpointError
from checkpoints.validate import validate_tensors

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint", "validate_tensors"]
