"""Tensor operations shared by methods, adapters and the runtime, with no knowledge of any of them:
gathering along the sequence (sequence.py) and VFlowOpt's token recycling (recycle.py)."""
