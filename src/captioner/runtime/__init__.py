"""Where the networks run: devices and precision, torchrun's process group."""
