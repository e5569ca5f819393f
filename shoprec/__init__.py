"""shoprec: keeps an online shop's search and recommendation models fresh."""

__version__ = "0.1.0"
