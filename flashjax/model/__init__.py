"""Pure-functional Flax modules of the decoder and its jitted entry points."""
