"""fastres: a high-throughput trainer for ResNet-family classifiers on CIFAR-10."""
__version__ = "0.1.0"
