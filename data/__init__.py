"""Bytes on disk: media shards (data/shards.py), decoding (data/media.py), sources (data/builtin.py) and the
token-shard format (data/tokens.py). No models, no argv."""

from data.builtin import BUILTIN_SOURCES, Source, SourceItem, open_source
from data.media import MediaError, MediaSpec
from data.shards import (MediaBatch, MediaManifest, ManifestError, list_shards, media_loader, read_manifest,
                         resume_position, sha256_file, write_media_shards)
from data.tokens import (TokenBatch, TokenManifest, TokenSample, code_dtype, load_tokens, pending_token_shards,
                         token_loader, write_token_shard)

__all__ = [
    "BUILTIN_SOURCES", "Source", "SourceItem", "open_source", "MediaError", "MediaSpec", "MediaBatch",
    "MediaManifest", "ManifestError", "list_shards", "media_loader", "read_manifest", "resume_position",
    "sha256_file", "write_media_shards", "TokenBatch", "TokenManifest", "TokenSample", "code_dtype",
    "load_tokens", "pending_token_shards", "token_loader", "write_token_shard",
]
