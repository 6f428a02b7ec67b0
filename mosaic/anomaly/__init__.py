"""Anomaly detection by multi-resolution knowledge distillation (MKD, Salehi et al., CVPR 2021).

A frozen source network's activations at a few critical layers are distilled into a smaller cloner
on normal images only; at test time the per-image discrepancy is the anomaly score and its gradient
with respect to the input localises the anomaly.

    roc.py       ROC-AUC with tied scores counted one half
    mkd.py       the source + cloner pair, layer choice, scoring, save / load
    method.py    fitting the cloner: the engine method `mkd` (ROC-AUC evaluation, the pair's files)
    localize.py  input-gradient maps, kornia smoothing, coloured overlays
    cli.py       `mosaic anomaly fit` (an engine run of method=mkd) / `mosaic anomaly score`

The value / direction losses live with the other feature losses in `mosaic.losses.feature`.
Submodules are imported on use, so importing this package is cheap.
"""
