"""Put ahead of the trainer's own path by the tests that start trainers in subprocesses: `import torch` fails there as
in an install without the test extra. torch (a test dependency, for the Hugging Face comparisons) is otherwise
imported by tensorboardX's writer, which takes a tensor type from it if it can: 1.6-2.4 s of each trainer's start,
for nothing the trainer uses."""

raise ImportError("torch is left out of the trainers that tests start (tests/no_torch)")
