"""Evaluators: plug-ins listed in `config.evals`, run by the training loop.

`base.py` holds the protocol; `classification.py` the top-1 / top-5
evaluation of a classifier; `monitor.py` the representation monitor of
pre-training (k-NN and few-shot on frozen features, maths in
`representation.py`).
"""
