"""The base layer: errors, units, options, device policy, console output and test kill points.

Every other package may import from here; nothing here imports from the rest of freelunch.
"""
