"""The training loop's parts: schedule, state and step, sharding, checkpoints,
logging and figures. `train.py` at the top level wires them together."""
