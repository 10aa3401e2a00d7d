"""The exception types importable from every layer: a user's mistake (`UserError`), an unreadable media file
(`MediaError`).

A `UserError` is something the person running a command can fix: a path that does not exist or holds something else,
a setting with a typo or a wrong type, a tokenizer and prior that do not belong together, an unfinished input
directory. Its message names the input and the fix. The commands (`pipelines.cli.run`) print it as one line and exit
with status 2. Any other exception is a bug and keeps its traceback.
"""

import re

BYTESIO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # what decoders call in-memory bytes


class UserError(Exception):
    """A mistake in the user's input or settings; the message names the input and says what to do."""


class MediaError(ValueError):
    """A file that cannot be read as the requested modality (corrupt, truncated, unsupported mode). Not a UserError:
    the shard writer skips the file, logs the reason with the file's origin and lists it in the manifest."""
