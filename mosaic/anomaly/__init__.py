"""Anomaly detection by multi-resolution knowledge distillation (MKD, Salehi et al., CVPR 2021).

A frozen source network's activations at a few critical layers are distilled into a smaller cloner
on normal images only; at test time the per-image discrepancy is the anomaly score and its gradient
with respect to the input localises the anomaly.

    losses.py    value / direction terms (pure functions)
    roc.py       ROC-AUC with tied scores counted one half
    mkd.py       the source + cloner pair, layer choice, scoring, save / load
    method.py    fitting the cloner: the engine method `mkd` (ROC-AUC evaluation, the pair's files)
    localize.py  input-gradient maps, kornia smoothing, coloured overlays
    cli.py       `mosaic anomaly fit` (an engine run of method=mkd) / `mosaic anomaly score`

Submodules are imported on use, so importing this package is cheap.
"""
