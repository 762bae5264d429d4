"""From one model to the next: the registry (`registry`), comparing a challenger with the champion (`compare`) and
distilling a student (`distill`)."""
