"""Atomic, verifiable checkpoints: codec (orjson + safetensors, no pickle), writer, reader, manager (sync/async
save, resume, retention, best), mirror (remote copies through fsspec), references, inspection."""

from rlswift.checkpoint.codec import CodecError, decode, encode
from rlswift.checkpoint.inspect import (Difference, compare_states, diff_checkpoints, inspect_checkpoint,
                                        read_hook_states)
from rlswift.checkpoint.manager import CheckpointManager
from rlswift.checkpoint.reader import (FORMAT_VERSION, CheckpointError, LoadedCheckpoint, read_checkpoint,
                                       read_manifest, verify)
from rlswift.checkpoint.refs import resolve_checkpoint

__all__ = [
    "CodecError", "encode", "decode",
    "CheckpointManager", "CheckpointError", "FORMAT_VERSION", "LoadedCheckpoint", "read_checkpoint",
    "read_manifest", "verify", "resolve_checkpoint",
    "Difference", "compare_states", "diff_checkpoints", "inspect_checkpoint", "read_hook_states",
]
