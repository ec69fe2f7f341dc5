"""Blocks that compose mixers into models (norms, MLPs, residual blocks, the Decoder).

Empty until the compose issue lands; mixers never import from here.
"""
