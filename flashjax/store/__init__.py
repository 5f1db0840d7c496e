"""flashjax's on-disk model directory: manifest, DRAM checkpoint, flash bundle store."""
