"""The training runtime shared by train_attr.py and train_fgvc.py.

Written once: checkpoints, learning-rate schedules over many Trainers,
contexts and data parallelism, progress and metric logs, error messages.
"""
