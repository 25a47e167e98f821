"""Searching over params: grids and tuned studies."""
