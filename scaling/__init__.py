"""jaxscale scaling: FLOPs / memory / MFU accounting, scaling laws and planning."""
