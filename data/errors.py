"""The one exception type for a user's mistake, importable from every layer.

A `UserError` is something the person running a command can fix: a path that does not exist or holds something else,
a setting with a typo or a wrong type, a tokenizer and prior that do not belong together, an unfinished input
directory. Its message names the input and the fix. The commands (`pipelines.cli.run`) print it as one line and exit
with status 2. Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input or settings; the message names the input and says what to do."""
