"""tdlrt: rank-adaptive Tucker training of CNNs from the command line."""
__version__ = "0.1.0"
