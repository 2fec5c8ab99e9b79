"""cai-jobs: Constitutional AI as a batch job suite."""

__version__ = "0.1.0"
