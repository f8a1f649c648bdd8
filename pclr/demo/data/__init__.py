"""CoIN-mini: eight synthetic tasks shaped like CoIN's, generated locally (see :mod:`pclr.demo.data.coin_mini`)."""
