"""Evaluating and calibrating quality scores the way the field reports them.

    metrics.py      ERC/EDC, pAUC, FNMR at a threshold (numpy only)
    protocols.py    pairs and validation sets (insightface .bin, LFW-style lists), the official pickles
    report.py       ``aikd evaluate``: EDC/ERC curves, pAUC tables and plots
    tables.py       normalised-pAUC tables in the paper's layout
    calibration.py  quality -> expected FNMR at an FMR (``aikd calibrate``)
"""
