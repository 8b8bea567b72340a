"""``aikd demo``: sample faces, degraded copies, and the illustrated report.

    samples.py       the sample photos installed packages ship
    degradations.py  21 graded degradations of a face (blur, noise, JPEG, ...)
    showcase.py      face sets, pairs and the report of the demo
"""
