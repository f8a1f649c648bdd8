"""Backends of the pclr ops. Chosen by :mod:`pclr.dispatch`; never import one directly in user code."""
