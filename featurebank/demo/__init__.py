"""`make demo`: featurebank's main job end to end, offline (see run.py for the steps).

`python -m featurebank.demo [--workdir DIR]`; the digits writer is reused by benchmarks.
"""

from featurebank.demo.digits import Digits, to_mnist_frame, write_digits
from featurebank.demo.run import main, run_demo

__all__ = ["Digits", "main", "run_demo", "to_mnist_frame", "write_digits"]
