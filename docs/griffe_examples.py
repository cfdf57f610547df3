"""A griffe extension for the API reference: reads our ``Example:`` sections as examples.

Our docstrings name their runnable section ``Example:`` (the house style); griffe's Google
parser knows only ``Examples:`` and would render the doctest as prose. This renames the section
header while the docs are built, so the ``>>>`` lines render as code. The source is not changed.
"""

import re

import griffe

_HEADER = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADER.sub(r"\1Examples:", obj.docstring.value)
