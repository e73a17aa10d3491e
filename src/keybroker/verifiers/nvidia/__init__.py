"""NVIDIA: Hopper GPUs (SPDM reports, or NRAS for GPUs and NVSwitches), BlueField DPUs (DICE)."""
