"""Atomic, verifiable checkpoints: codec (orjson + safetensors, no pickle), manager, reader, retention, inspection."""

from rlswift.checkpoint.codec import CodecError, decode, encode
from rlswift.checkpoint.inspect import (Difference, compare_states, diff_checkpoints, inspect_checkpoint,
                                        read_hook_states)
from rlswift.checkpoint.manager import CheckpointManager
from rlswift.checkpoint.reader import FORMAT_VERSION, CheckpointError, read_manifest, verify

__all__ = [
    "CodecError", "encode", "decode",
    "CheckpointManager", "CheckpointError", "FORMAT_VERSION", "read_manifest", "verify",
    "Difference", "compare_states", "diff_checkpoints", "inspect_checkpoint", "read_hook_states",
]
