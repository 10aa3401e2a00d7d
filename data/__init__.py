"""Bytes on disk: atomic writes and hashes (data/files.py), the modality registry (data/media.py; per modality
data/image.py, data/audio.py), sources (data/builtin.py), media shards (data/shards.py: writer, manifest, split) and
their reader (data/reader.py), and the token-shard format (data/tokens.py). No models, no argv."""

from data.builtin import BUILTIN_SOURCES, Source, SourceItem, open_source
from data.errors import MediaError, UserError
from data.files import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic
from data.media import MODALITIES, MediaSpec, to_file_bytes, to_integers
from data.reader import MediaBatch, media_loader, resume_position
from data.shards import MediaManifest, ManifestError, list_shards, read_manifest, write_media_shards
from data.tokens import (TokenBatch, TokenManifest, TokenSample, code_dtype, load_tokens, pending_token_shards,
                         token_loader, write_token_shard)

__all__ = [
    "BUILTIN_SOURCES", "Source", "SourceItem", "open_source", "MediaError", "UserError", "atomic_path", "sha256_file",
    "write_bytes_atomic", "write_json_atomic", "write_text_atomic", "MODALITIES", "MediaSpec", "to_file_bytes",
    "to_integers", "MediaBatch", "media_loader", "resume_position", "MediaManifest", "ManifestError", "list_shards",
    "read_manifest", "write_media_shards", "TokenBatch", "TokenManifest", "TokenSample", "code_dtype", "load_tokens",
    "pending_token_shards", "token_loader", "write_token_shard",
]
