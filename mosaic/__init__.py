"""mosaic-kd: knowledge distillation when the teacher's data is gone (MosaicKD and baselines).

Importing `mosaic` alone loads nothing heavy (`mosaic.config` stays torch-free); `mosaic.models`
(imported by everything that builds a network) registers the CIFAR networks in timm.
"""
__version__ = "0.1.0"
