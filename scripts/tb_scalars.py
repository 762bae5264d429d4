"""Print the scalars of TensorBoard runs (last value and step of each tag), e.g. to follow a background run.

python scripts/tb_scalars.py runs/experiments/minilm_full
"""

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir: str) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, wall_time, value)] over every events file below run_dir."""
    out: dict[str, list] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    return out


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print(run)
        for tag, events in sorted(scalars(run).items()):
            step, wall, value = events[-1]
            print(f"  {tag:28s} step {step:6d}  {value:.4f}  ({len(events)} points, {wall - events[0][1]:.0f}s span)")
