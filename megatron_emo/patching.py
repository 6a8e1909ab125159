"""Reversible attribute patches: a ``Patch`` record and a ``PatchSet`` that applies and undoes them.

Shared by the CPU backend (``megatron_emo.cpu``), the megatron.training start-up fixes
(``megatron_emo.training.compat``) and ``--emo-dry-run`` (``megatron_emo.train``). Imports neither
megatron nor anything CUDA-specific, so GPU runs may import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Patch", "PatchSet"]

_ABSENT = object()  # the attribute was not in the target's own namespace


@dataclasses.dataclass(frozen=True)
class Patch:
    """One attribute of one object replaced, and the code the replacement works around.

    Attributes:
        target: the module or class whose attribute is replaced, or its dotted import path
            (resolved when the patch is applied, so a table of patches imports nothing).
        name: the attribute.
        replacement: the new value; with ``wraps``, a callable ``original -> new value``.
        site: what the patch covers, as ``file:line`` of the patched library.
        wraps: whether ``replacement`` builds the new value from the original attribute.
        group: a label for selecting patches from a table (the CPU backend's
            ``"backend"``/``"training"``).
    """

    target: Any
    name: str
    replacement: Any
    site: str
    wraps: bool = False
    group: str = ""

    def resolve(self) -> Any:
        """The target object (imported here when given as a dotted path)."""
        if isinstance(self.target, str):
            return pkgutil.resolve_name(self.target)
        return self.target


def _restore(saved: list[tuple[Any, str, Any]]) -> None:
    for target, name, original in reversed(saved):
        if original is _ABSENT:
            delattr(target, name)  # e.g. a method the class inherited: inherited again
        else:
            setattr(target, name, original)


class PatchSet:
    """Patches applied together and undone together.

    ``apply()`` is idempotent; ``with patch_set:`` applies and undoes (unless the set was
    already applied when the block began). ``undo()`` exits the contexts, then restores every
    attribute as it was before ``apply()`` (in reverse order; an attribute that was not in the
    target's own namespace, such as an inherited method, is deleted again).

    Args:
        patches: the patches, applied in order.
        contexts: factories of context managers entered after the patches are applied (e.g. a
            torch function mode) and exited before they are undone.
    """

    def __init__(
        self,
        patches: Iterable[Patch],
        contexts: Iterable[Callable[[], contextlib.AbstractContextManager]] = (),
    ) -> None:
        self.patches = tuple(patches)
        self._contexts = tuple(contexts)
        self._saved: list[tuple[Any, str, Any]] | None = None
        self._stack: contextlib.ExitStack | None = None
        self._entered: list[bool] = []

    @property
    def applied(self) -> bool:
        """Whether the patches are in place."""
        return self._saved is not None

    def apply(self) -> bool:
        """Applies every patch, then enters the contexts.

        Returns:
            True if this call applied them, False if they already were (nothing done).
        """
        if self._saved is not None:
            return False
        saved: list[tuple[Any, str, Any]] = []
        stack = contextlib.ExitStack()
        try:
            for patch in self.patches:
                target = patch.resolve()
                saved.append((target, patch.name, vars(target).get(patch.name, _ABSENT)))
                value = patch.replacement
                if patch.wraps:
                    value = value(getattr(target, patch.name))
                setattr(target, patch.name, value)
            for factory in self._contexts:
                stack.enter_context(factory())
        except BaseException:
            stack.close()
            _restore(saved)
            raise
        self._saved, self._stack = saved, stack
        return True

    def undo(self) -> bool:
        """Exits the contexts and restores every patched attribute.

        Returns:
            True if this call undid the patches, False if they were not applied.
        """
        if self._saved is None:
            return False
        saved, stack = self._saved, self._stack
        self._saved = self._stack = None
        try:
            stack.close()
        finally:
            _restore(saved)
        return True

    def __enter__(self) -> PatchSet:
        self._entered.append(self.apply())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._entered.pop():  # undo only what this ``with`` applied
            self.undo()
