"""Topology, placement and ``launch()``."""
