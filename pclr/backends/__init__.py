"""Backends of the pclr ops, chosen by :mod:`pclr.dispatch`; never import one directly in user code.

``pclr.backends()`` (this package, made callable) returns {name: [reasons it cannot run here]}: an empty list
means the backend is usable.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self) -> dict:
        from pclr.dispatch import available_backends

        return available_backends()


# `pclr.backends` is both this package and the public `pclr.backends()` report: importing a submodule rebinds the
# attribute `pclr.backends` to the package, so the package itself must be the callable.
sys.modules[__name__].__class__ = _CallablePackage
