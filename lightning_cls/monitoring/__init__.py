"""Drift and accuracy from answers and feedback: the maths (`drift`, `label_set_drift`) and the offline `monitor`
command (`monitor`)."""
