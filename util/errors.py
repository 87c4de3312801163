"""The one exception type for bad user input.

Anything the user can fix (a wrong path, a flag that conflicts with a checkpoint, a corrupt image) raises
``UserError`` with a one-line message that names the file or flag and the fix. ``main.py`` prints it as
``error: <message>`` and exits with code 2, without a traceback.
"""


class UserError(Exception):
    pass
