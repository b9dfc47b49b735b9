"""DDP modes with IST: step time and bytes reduced per mode (``torchrun ... -m
benchmarks.ddp``, :mod:`.modes`)."""
