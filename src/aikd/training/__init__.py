"""Training an AI-KD student (Babnik et al., IWBF 2024): data, the distillation task, and the loop.

    data.py       training indexes (image, landmarks, label), aligned/misaligned pairs, loaders
    distill.py    the AI-KD task: frozen teacher + student + loss (SmoothL1 + 1 - cos)
    train.py      the loop: optimiser, schedule, AMP, torchrun, checkpoints, resume
    synthetic.py  generated faces for tests and pipeline checks
"""
