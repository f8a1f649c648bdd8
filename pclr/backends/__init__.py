"""Backends of the pclr ops, chosen by :mod:`pclr.dispatch`; never import one directly in user code.

``pclr.available_backends()`` reports which can run here and why not. :mod:`pclr.backends.base` holds what they
share (input types, the Backend protocol); :mod:`pclr.backends.custom_op` registers their ops.
"""
