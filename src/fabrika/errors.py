"""The one exception type users see.

Anything a user can fix (a config key, a missing file, a bad row) is raised as `FabrikaError` with a
message that names the file, key or row and says what was expected. The CLI prints it without a
traceback and exits with status 2; everything else is a bug and keeps its traceback.
"""


class FabrikaError(Exception):
    exit_code = 2


def require(condition: bool, message: str) -> None:
    if not condition:
        raise FabrikaError(message)
