"""jaxscale experiments: runnable training scripts and presets."""
