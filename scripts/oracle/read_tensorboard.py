"""Reads a folder of TensorBoard event files with TensorBoard's own loader (EventAccumulator,
orphaned data purged as `tensorboard --logdir` does) and prints what it holds as JSON:
{"scalars": {tag: [[step, value], ...]}, "images": {tag: [[step, width, height, PNG length], ...]}}.

Usage: read_tensorboard.py FOLDER
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

accumulator = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0}, purge_orphaned_data=True)
accumulator.Reload()
tags = accumulator.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in accumulator.Scalars(t)] for t in tags["scalars"]},
    "images": {t: [[e.step, e.width, e.height, len(e.encoded_image_string)] for e in accumulator.Images(t)]
               for t in tags["images"]},
}))
